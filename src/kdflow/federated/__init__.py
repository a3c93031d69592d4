"""Federated mutual knowledge transfer (FedMKT): the round as plain steps, selection, wire format.

`fedmkt.py` runs the round in-process; `flower_app.py` runs the same steps over Flower.
"""
