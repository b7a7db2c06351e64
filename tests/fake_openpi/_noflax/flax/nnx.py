"""flax.nnx stand-in: split a stand-in model into (graphdef, parameters) and merge them back."""


def split(model):
    return (type(model), model.config), dict(model.params)


def merge(graphdef, state):
    cls, config = graphdef
    return cls(config, params=state)
