"""Blocks shared by several families."""
