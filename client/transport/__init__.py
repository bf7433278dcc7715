"""The site's transport: how a coordinator's message reaches the site's handler and its reply leaves.

* :mod:`.supernode`: the SuperNode shell (``python -m dicomfl.client.transport.supernode``):
  Flower's own SuperNode with shorter waits, waking the warm worker when a message has arrived.
* :mod:`.warm`: the warm worker, one long-lived process per site that holds torch, the site's data
  and the trainers, and serves the handler on a private Unix socket.
* :mod:`.tasks`: the task loop, with which the warm worker takes the SuperNode's ClientApp tasks
  over its Runtime API (``federation.message_path: direct``, the default).
* :mod:`.wakeup`: the datagram with which the SuperNode wakes the task loop.
* :mod:`.secret`: the SuperExec secret that signs the task loop's asks.
* :mod:`.forwarder`: the ClientApp that forwards each message to the warm worker over its socket
  (``federation.message_path: forwarder``).
* :mod:`.flower_adapter`: every use of Flower's internals on the site's side.

What the site answers is decided elsewhere (:mod:`dicomfl.client.handler`); nothing here reads or
changes a message's content.
"""
