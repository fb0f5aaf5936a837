"""Evaluation engines: judges of generated and reconstructed images.

judge.load_judge(data)   the independent classifier judge of an embedded dataset (class accuracy, FD_<judge>)
"""
