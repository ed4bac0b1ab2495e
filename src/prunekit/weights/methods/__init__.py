"""One file per weight method; importing a module registers it."""
