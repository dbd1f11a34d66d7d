# placeholder until the load generator lands
def send_burst(*args, **kwargs):
    raise NotImplementedError
