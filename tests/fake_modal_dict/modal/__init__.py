"""A stand-in for the one piece of Modal a ``modal://`` client touches: ``modal.Dict.from_name``.

Only for tests that run a client in another process (``bench --clients N --url modal://…``): the Dict is a
dict served by a ``multiprocessing`` manager in the test process, found through ``FAKE_MODAL_DICT``
(``host:port:authkey-hex``). Everything else about Modal is absent on purpose.
"""

from __future__ import annotations

import os
from multiprocessing.managers import BaseManager, DictProxy


class _StoreManager(BaseManager):
    pass


_StoreManager.register("store", proxytype=DictProxy)


class Dict:
    @staticmethod
    def from_name(name: str, *, environment_name: str | None = None, create_if_missing: bool = False):
        host, port, key = os.environ["FAKE_MODAL_DICT"].rsplit(":", 2)
        manager = _StoreManager(address=(host, int(port)), authkey=bytes.fromhex(key))
        manager.connect()
        return manager.store()
