"""Jobs and the command line: the only layer that sees both the model (embsum/) and storage (index/)."""
