"""Networks: MLP for low-dimensional data, a small UNet for images."""
