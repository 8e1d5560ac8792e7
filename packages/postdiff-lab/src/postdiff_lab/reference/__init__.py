"""The embedded reference model (class-conditional Fashion-MNIST UNet) and its pipeline."""
