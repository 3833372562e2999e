"""The bottom layer: what training, engine and node share, in numpy and the standard library only.

Nothing here imports torch, the model, the engine or the node, so every layer can import it and no
import circle can form (test/test_layers.py checks both).
"""
