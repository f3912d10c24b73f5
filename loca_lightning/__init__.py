"""LOCA for PyTorch Lightning."""
