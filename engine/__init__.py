"""lowbit.engine"""
