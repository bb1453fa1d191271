"""fewstep.methods."""
