"""lowbit.cli"""
