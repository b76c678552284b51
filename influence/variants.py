"""The registered IWD variants of the built-in methods (one line each) and the ablations."""
from methods.dc import DC, DSAMethod
from methods.dm import DM
from methods.idc import IDC
from methods.pdd import PDD, PDDDC

from .iwd import influence_weighted

IWDDC = influence_weighted(DC)
IWDDSA = influence_weighted(DSAMethod)
IWDDM = influence_weighted(DM)
IWDIDC = influence_weighted(IDC)
IWDPDD = influence_weighted(PDD)
IWDPDDDC = influence_weighted(PDDDC)

from . import ablations  # noqa: F401,E402
