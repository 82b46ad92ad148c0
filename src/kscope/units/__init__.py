"""Units of analysis at a site: neurons, SAE features, other decompositions; SAE training and corpora."""
