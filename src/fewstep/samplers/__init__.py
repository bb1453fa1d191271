"""fewstep.samplers."""
