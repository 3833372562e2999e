"""The bottom layer: what training, engine and node share (frames, prompts, vocabulary, devices, files, paths).

Nothing here imports torch, the model, the engine or the node (numpy, yaml, scipy, scikit-image and OpenCV
only), so every layer can import it and no import circle can form (test/test_layers.py checks both).
"""
