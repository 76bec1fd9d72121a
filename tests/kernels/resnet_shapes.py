"""The BatchNorm shapes the GPU-filling checks use: every BatchNorm of the CIFAR ResNet-18
(N = 128 as one group; N = 256 as two) and of torchvision's ResNet-50 at 224 px (batch 64 as one
group; 128 as two), as (N, C, side, groups) with H = W = side."""

R18_BN = [(64, 32), (128, 16), (256, 8), (512, 4)]  # (channels, side)
R50_BN = [(64, 112), (64, 56), (128, 56), (128, 28), (256, 56), (256, 28), (256, 14), (512, 28), (512, 14),
          (512, 7), (1024, 14), (1024, 7), (2048, 7)]
BN_SHAPES = ([(128, c, s, 1) for c, s in R18_BN] + [(256, c, s, 2) for c, s in R18_BN]
             + [(64, c, s, 1) for c, s in R50_BN] + [(128, c, s, 2) for c, s in R50_BN])
