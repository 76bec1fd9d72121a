"""Data: conversion of user data to device tensors, the datasets fastpurify reads, and the
device-resident batch sampler with the ANP augmentation.

All images are float tensors (N, C, H, W) with pixels in [0, 1]; labels are int64 (N,).
"""

from .cifar10 import CIFAR10_FILES, load_cifar10
from .convert import as_tensors, infer_num_classes
from .digits import load_digits
from .image_folder import ImageFolderData, load_image_folder
from .sampler import DeviceBatchSampler, augment_batch, make_generator
from .sources import DataSplits, load_source
from .split import train_test_split
from .synthetic import synthetic_dataset

__all__ = [
    "CIFAR10_FILES",
    "DataSplits",
    "DeviceBatchSampler",
    "ImageFolderData",
    "as_tensors",
    "augment_batch",
    "infer_num_classes",
    "load_cifar10",
    "load_digits",
    "load_image_folder",
    "load_source",
    "make_generator",
    "synthetic_dataset",
    "train_test_split",
]
