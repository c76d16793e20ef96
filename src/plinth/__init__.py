"""plinth: train, adapt, evaluate and serve foundation models from one readable toolkit.

plinth quickstart          # prepare data, train a small model on this CPU, show samples
plinth config explain      # every option, what it does and when to change it
"""

__version__ = "0.1.0"
