"""Test session set-up: one torch thread per worker (pytest -n 2 on 2 cores; tiny tensors
spin-wait badly with more), and float defaults left untouched."""
import torch

torch.set_num_threads(1)
