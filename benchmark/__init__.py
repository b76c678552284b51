"""The shared kitchen: datasets, networks, augmentation, the method registry and protocol, the runner."""
