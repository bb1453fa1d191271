"""Datasets: toy 2-D sets, images, user files, and the exact Gaussian-mixture teacher."""
