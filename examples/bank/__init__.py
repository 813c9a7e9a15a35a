"""A small bank: accounts are opened, receive deposits and withdrawals, and are closed.

Three projections of different kinds (a keyed balance table, an append-only
history, a daily aggregate) and a second version of the balances projector
that adds columns, to show a rebuild into a new shape.
"""
