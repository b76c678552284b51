"""The IWD variants of the built-in methods: one line each (influence.influence_weighted registers iwd+<name>)."""
from influence import influence_weighted

from .dc import DC, DSAMethod
from .dm import DM
from .idc import IDC
from .pdd import PDD, PDDDC

IWDDC = influence_weighted(DC)
IWDDSA = influence_weighted(DSAMethod)
IWDDM = influence_weighted(DM)
IWDIDC = influence_weighted(IDC)
IWDPDD = influence_weighted(PDD)
IWDPDDDC = influence_weighted(PDDDC)
