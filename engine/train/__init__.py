"""Training a sidecar MTP head for a trunk model on the CPU (`llamba mtp-train`, optional extra llamba[train])."""
