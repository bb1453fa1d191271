"""Datasets: toy 2-D sets, images, user files, and the exact Gaussian-mixture teacher."""
from .registry import Dataset, dataset_names, load_dataset
from .toys import TOYS, make_toy
