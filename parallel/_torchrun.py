"""torchrun, with its rendezvous store listening on 127.0.0.1 only.

    python _torchrun.py [torchrun options] SCRIPT      (the launcher adds --master-port itself)

torchrun's static rendezvous hosts a TCPStore on every interface (`*:<port>`), unauthenticated,
for the life of the group, whatever --master-addr says. TCPStore takes an already-listening
socket (`master_listen_fd`), so this wrapper binds one to 127.0.0.1, passes it to the store that
the agent creates as master, and runs torchrun's own main unchanged. Holding the socket from bind
to listen also closes the race of picking a free port and binding it later.
"""
import os
import socket
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # don't let parallel/*.py shadow top-level modules (e.g. `transport`)

import torch.distributed as dist
from torch.distributed import run
from torch.distributed.elastic.rendezvous import static_tcp_rendezvous


def main():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]

    def loopback_store(host, port_, world_size=None, is_master=False, *args, **kwargs):
        if is_master and port_ == port:
            kwargs["master_listen_fd"] = listener.fileno()
        return dist.TCPStore(host, port_, world_size, is_master, *args, **kwargs)

    static_tcp_rendezvous.TCPStore = loopback_store
    run.main(["--master-addr=127.0.0.1", f"--master-port={port}", *sys.argv[1:]])


if __name__ == "__main__":
    main()
