"""What a trained model becomes: BatchNorm folding, the compact export and its report,
the deployed forms (``torch.export``, ONNX Runtime), reading trained models back
(``loading``) and shipping a dense checkpoint.

Imports the layers below it (errors, io, pruning, methods) and this folder.
"""
