"""lowbit.engine.kernels"""
