"""fewstep.train."""
