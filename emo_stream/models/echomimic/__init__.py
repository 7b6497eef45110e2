"""EchoMimic v1 (github antgroup/echomimic, weights BadToBest/EchoMimic, Apache-2.0) as an emo-stream family.

See model.py for the Python API; importer.py for reading the published files; parity.py for the golden-set
replay behind `emo-stream parity`.
"""
