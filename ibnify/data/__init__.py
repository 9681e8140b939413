"""Data: image folders and batches (images), the digits demo set (digits, the only
scikit-learn import), the data a command names (sources) and the appearance shifts (shifts).

Nothing is imported here, so that ``ibnify.data.images`` never loads scikit-learn.
"""

__all__: list[str] = []
