"""placeholder"""


def register(app, srv, http) -> None:
    pass
