"""A from-scratch PyTorch DDPM library: schedules, UNet, training, samplers, evaluation.

Pure: imports torch, numpy, PIL (and datasets for image sources), never an
orchestration or tracking tool.
"""
