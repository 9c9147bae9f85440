#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/corpus/<target>/: small realistic inputs in each target's
input format (see the comment at the top of each fuzz_targets/*.rs). Run it again after
changing a format; the fuzzer's own finds are kept beside these, and crashes found later are
added as crash-<what> files by hand.

    python3 fuzz/seeds.py
"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def cuts(*positions):
    return b"".join(struct.pack(">H", p) for p in positions)


def frame(payload):
    return struct.pack(">I", len(payload)) + payload


PULSE = b"advanced-watchdog pulse"
PULSE_REPLY = b"advanced-watchdog reply pulse"

# --- decoder: two u16 cut positions, then the stream --------------------------------------
NOTIFY = (
    b"WATCHDOG=1\nWATCHDOG=trigger\nWATCHDOG_USEC=2500000\nCHECKPOINT=init\n"
    b"CONDITION=ready=1\nCONDITION=ready=0\nSTATUS=all good\nhello\n\nX=Y\r\n"
)
write("decoder", "notify-lines", cuts(5, 40) + NOTIFY)
write(
    "decoder",
    "frames-and-pulses",
    cuts(2, 30) + frame(PULSE) + frame(PULSE_REPLY) + frame(b"") + frame(b"CHECKPOINT=a"),
)
write(
    "decoder",
    "bad-values",
    cuts(0, 17)
    + b"WATCHDOG_USEC=abc\nWATCHDOG_USEC=0\nCHECKPOINT=\nCHECKPOINT=a b\nCONDITION=x\n",
)
write("decoder", "lying-frame", cuts(3, 9) + b"\x00\xff\xff\xffjunk\nWATCHDOG=1\n")
write("decoder", "invalid-utf8", cuts(1, 2) + b"\xff\xfe\nSTATUS=\xc3\xa9t\xc3\xa9\n")
write(
    "decoder",
    "status-runs",
    cuts(12, 50)
    + b"STATUS=a\nSTATUS=b\nCHECKPOINT=x\nSTATUS=c\nWATCHDOG_USEC=1000\nWATCHDOG_USEC=2000\n",
)
write("decoder", "long-line", cuts(4000, 4100) + b"a" * 4100 + b"\nWATCHDOG=1\n")
write(
    "decoder",
    "agent-mix",
    cuts(7, 7) + frame(PULSE) + b"CHECKPOINT=tick\r\n" + frame(PULSE_REPLY) + b"CONDITION=app-ready=1\n",
)

# --- agent_line: two u16 cut positions, then what a local client writes --------------------
write("agent_line", "relayed", cuts(6, 30) + b"CHECKPOINT=tick\nCONDITION=app-ready=1\nSTATUS=ok\nWATCHDOG=1\n")
write("agent_line", "refused", cuts(3, 20) + b"hello\nCHECKPOINT=a b\nCONDITION=x=2\nWATCHDOG_USEC=0\n")
write("agent_line", "crlf-and-last-line", cuts(1, 9) + b"WATCHDOG=trigger\r\nWATCHDOG_USEC=5000000")
write("agent_line", "too-long", cuts(100, 4200) + b"STATUS=" + b"x" * 4200 + b"\nCHECKPOINT=after\n")
write("agent_line", "not-utf8", cuts(2, 4) + b"STATUS=\xff\nCHECKPOINT=ok\n")

# --- notify_datagram: one datagram sent to the agent's notify socket ----------------------
write("notify_datagram", "ready", b"READY=1\nSTATUS=serving\nMAINPID=42\nWATCHDOG_USEC=5000000\n")
write("notify_datagram", "ping", b"WATCHDOG=1")
write("notify_datagram", "stopping", b"STOPPING=1\nSTATUS=bye\nEXTEND_TIMEOUT_USEC=20000000")
write("notify_datagram", "bad", b"WATCHDOG=1\nWATCHDOG=0\nhello\nREADY=yes")
write("notify_datagram", "awd-lines", b"CHECKPOINT=loaded\r\nCONDITION=db=1\nWATCHDOG=trigger\nX_OTHER=1\n\n")

# --- control_request: what a client writes to the control socket ---------------------------
write("control_request", "status", '{"cmd":"status"}\n')
write("control_request", "enable-disable", '{"cmd":"disable","target":"vm1/main-loop"}\n{"cmd":"enable","target":"vm1/main-loop"}\n{"cmd":"disable","target":"vm2"}\n{"cmd":"enable","target":"vm2"}\n')
write("control_request", "conditions", '{"cmd":"condition","name":"maintenance-off","value":false}\n{"cmd":"condition","name":"maintenance-off","value":true,"watchdog":"vm1"}\n{"cmd":"condition","name":"app-ready","value":true,"watchdog":"vm1"}\n')
write("control_request", "refusals", '{"cmd":"enable","target":""}\n{"cmd":"disable","target":"vm1/nope"}\n{"cmd":"enable","target":"vm3"}\n{"cmd":"reboot"}\nnot json\r\n')
write("control_request", "no-newline", '{"cmd":"status"}')

# --- seed_args: one `chardev ARG` / `object ARG` per line --------------------------------
write(
    "seed_args",
    "local-guest",
    "--chardev socket,id=hb,path=/run/awd/vm1-hb.sock,server=on,wait=off\n"
    "--chardev socket,id=mon,path=/run/awd/vm1-qmp.sock\n"
    "--object advanced-watchdog,id=vm1,awd_node=hb,notification_node=mon,opt_script=/etc/awd/quit.script,timeout=5000,grace=60000\n",
)
write(
    "seed_args",
    "colo-seed",
    "-chardev socket,id=detection,host=0.0.0.0,port=9009,server,nowait\n"
    "-chardev socket,id=notification,host=127.0.0.1,port=4445\n"
    "-object iothread,id=iothread1\n"
    "-object advanced-watchdog,id=awd1,server=on,awd_node=detection,notification_node=notification,opt_script=colo_opt_script,iothread=iothread1,pulse_interval=1000,timeout=5000\n",
)
write(
    "seed_args",
    "vsock",
    "--chardev vhost-user-vsock,id=hb,path=/run/awd/vm1-vsock.sock,guest-cid=3,port=9009\n"
    "--chardev vhost-user-vsock,id=app,path=/run/awd/vm1-vsock.sock,guest-cid=3,port=9010,rate-limit=50\n"
    "--chardev socket,id=mon,path=/run/awd/vm1-qmp.sock\n"
    "--object advanced-watchdog,id=vm1,awd_node=hb,notification_node=mon,opt_script=/etc/awd/quit.script,timeout=5000,grace=60000,pulse_interval=1000\n"
    "--object advanced-watchdog,id=vm1-app,awd_node=app,notification_node=mon,opt_script=/etc/awd/quit.script,timeout=30000,grace=60000\n",
)
write(
    "seed_args",
    "colo-primary",
    "--chardev socket,id=h1,host=0.0.0.0,port=9009,server=on,wait=off,max-connections=8,peers=192.0.2.0/24,peers=127.0.0.1,tcp-user-timeout=3000\n"
    "--chardev socket,id=mon,host=127.0.0.1,port=4445\n"
    "--object advanced-watchdog,id=heart1,server=on,awd_node=h1,notification_node=mon,opt_script=/etc/awd/colo_primary_opt_script,pulse_interval=1000,timeout=5000,follow-vm=off\n",
)
write(
    "seed_args",
    "colo-secondary",
    "--chardev socket,id=h1,host=203.0.113.3,port=9009,reconnect=1,nodelay=on\n"
    "--chardev socket,id=mon,path=/run/awd/secondary-qmp.sock\n"
    "--object advanced-watchdog,id=heart1,server=off,awd_node=h1,notification_node=mon,opt_script=colo_secondary_opt_script,timeout=10000\n",
)
write(
    "seed_args",
    "escaped-comma",
    "--chardev socket,id=d,path=/run/awd/a,,b.sock,server=on\n"
    "--object advanced-watchdog,id=w,awd_node=d,timeout=5000\n"
    "socket,id=x,port-vsock=3\n",
)

# --- toml_config: the file's text ---------------------------------------------------------
write(
    "toml_config",
    "basic",
    """[chardev.detection]
host = "0.0.0.0"
port = 9009
server = true

[chardev.notification]
host = "127.0.0.1"
port = 4445

[watchdog.awd1]
awd_node = "detection"
notification_node = "notification"
script = ["quit"]
pulse_interval = 1000
timeout = 5000
""",
)
write(
    "toml_config",
    "escalation",
    """[chardev.hb]
path = "/run/awd/vm1-hb.sock"
server = true

[chardev.mon]
path = "/run/awd/vm1-qmp.sock"

[watchdog.vm1]
awd_node = "hb"
notification_node = "mon"
timeout = 5000
script = ["system_reset"]
expired_tolerance = 120000
stopped_script = ["quit"]

[[watchdog.vm1.escalate]]
after = 30000
script = ["system_powerdown"]

[[watchdog.vm1.escalate]]
after = 60000
opt_script = "quit.script"
""",
)
write(
    "toml_config",
    "alive",
    """[chardev.hb]
path = "/run/awd/hb.sock"
server = true

[watchdog.app]
awd_node = "hb"
timeout = 5000
conditions = ["vm-running"]
guest_conditions = { app-ready = false }

[[watchdog.app.alive]]
name = "main-loop"
checkpoint = "tick"
cycle = 1000
expected = 10
min_margin = 2
max_margin = 2
tolerance = 3
conditions = ["vm-running", "app-ready"]
""",
)
write(
    "toml_config",
    "deadline",
    """[chardev.hb]
path = "/run/awd/hb.sock"
server = true

[watchdog.app]
awd_node = "hb"
timeout = 5000
expired_tolerance = 10000
operator_conditions = { maintenance-off = true }

[[watchdog.app.deadline]]
name = "request"
start = "req-start"
end = "req-end"
min = 10
max = 500
conditions = ["vm-running", "maintenance-off"]
""",
)
write(
    "toml_config",
    "logical",
    """[chardev.hb]
path = "/run/awd/hb.sock"
server = true

[watchdog.app]
awd_node = "hb"
timeout = 5000
timeout_min = 1000
timeout_max = 60000

[[watchdog.app.logical]]
name = "boot"
checkpoints = ["init", "config", "ready"]
entry = ["init"]
exit = ["ready"]
transitions = [["init", "config"], ["config", "ready"]]
""",
)
write(
    "toml_config",
    "colo-primary",
    """[chardev.h1]
host = "0.0.0.0"
port = 9009
server = true
max_connections = 8
peers = ["192.0.2.0/24", "127.0.0.1"]
tcp_user_timeout = 3000
rate_limit = 1000

[chardev.mon]
host = "127.0.0.1"
port = 4445

[watchdog.heart1]
awd_node = "h1"
notification_node = "mon"
script = ["x_colo_lost_heartbeat"]
server = true
pulse_interval = 1000
timeout = 5000
follow_vm = false
""",
)
write(
    "toml_config",
    "vsock",
    """[chardev.hb]
backend = "vhost-user-vsock"
path = "/run/awd/vm1-vsock.sock"
guest-cid = 3
port = 9009

[chardev.mon]
path = "/run/awd/vm1-qmp.sock"

[watchdog.vm1]
awd_node = "hb"
notification_node = "mon"
opt_script = "quit.script"
timeout = 5000
grace = 60000
""",
)

# --- qmp / hmp: a mask byte of script lines, a remembered-kind byte, then the monitor's
# output with 0xFF between reads (lines: bit 0 stop, 1 info status, 2 cont,
# 3 x_colo_lost_heartbeat, 4 nbd_server_stop, 5 system_reset, 6 system_powerdown, 7 quit) --
CUT = b"\xff"
GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, '
    b'"package": "Debian 1:7.2+dfsg-7+deb12u7"}, "capabilities": ["oob"]}}\r\n'
)
NEGOTIATED = b'{"return": {}}\r\n'


def ts(event, data=None):
    s = b'{"timestamp": {"seconds": 1718000000, "microseconds": 123456}, "event": "' + event + b'"'
    if data is not None:
        s += b', "data": ' + data
    return s + b"}\r\n"


def qmp(name, mask, known, *reads):
    write("qmp", name, bytes([mask, known]) + CUT.join(reads))


qmp("stop", 0b1, 0, GREETING, NEGOTIATED, b'{"return": {}, "id": 1}\r\n' + ts(b"STOP"))
qmp(
    "info-status",
    0b10,
    1,
    GREETING,
    ts(b"RESUME") + NEGOTIATED,
    b'{"return": "VM status: running\\r\\n", "id": 1}\r\n',
)
qmp(
    "colo-error",
    0b1000,
    0,
    GREETING,
    NEGOTIATED,
    b'{"event": "MEM_UNPLUG_ERROR", "data": {}}\r\n'
    b'{"id": 1, "error": {"class": "GenericError", "desc": "The feature \'colo\' is not enabled"}}\r\n',
)
qmp(
    "quit",
    0b10000000,
    1,
    GREETING,
    NEGOTIATED,
    ts(b"SHUTDOWN", b'{"guest": false, "reason": "host-qmp-quit"}'),
)
qmp(
    "every-line",
    0xFF,
    0,
    GREETING + NEGOTIATED,
    b"".join(b'{"return": {}, "id": %d}\r\n' % i for i in range(1, 5)),
    ts(b"STOP") + ts(b"MIGRATION", b'{"status": "active"}'),
    b"".join(b'{"return": {}, "id": %d}\r\n' % i for i in range(5, 9)),
)
qmp(
    "split-greeting-late-reply",
    0b11,
    0,
    GREETING[:20],
    GREETING[20:] + NEGOTIATED,
    b'{"return": {}, "id": 7}\r\n{"return": "VM status: paused (debug)\\r\\n", "id": 2}\r\n',
)
qmp("negotiation-refused", 0b1, 0, GREETING, b'{"error": {"class": "CommandNotFound", "desc": "nope"}}\r\n')
qmp("not-qmp-json", 0b1, 0, b'{"hello": "world"}\n')

HMP_GREETING = b"QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) "


def hmp(name, mask, known, *reads):
    write("hmp", name, bytes([mask, known]) + CUT.join(reads))


hmp("info-status", 0b10, 0, HMP_GREETING, b"info status\r\nVM status: running\r\n(qemu) ")
hmp("stop-cont", 0b101, 2, HMP_GREETING, b"stop\r\n(qemu) ", b"cont\r\n(qemu) ")
hmp(
    "escapes",
    0b10,
    0,
    HMP_GREETING,
    b"info status\r\n\x1b[K\x1b[DVM status: paused\r\n(qemu) ",
)
hmp(
    "colo-error",
    0b1000,
    0,
    HMP_GREETING,
    b"x_colo_lost_heartbeat\r\nError: The feature 'colo' is not enabled\r\n(qemu) ",
)
hmp("quit", 0b10000000, 2, HMP_GREETING, b"quit\r\n")
hmp("prompt-split", 0b10, 0, HMP_GREETING[:30], HMP_GREETING[30:-3], HMP_GREETING[-3:], b"info status\r\nVM status: running\r\n(qe", b"mu) ")
hmp("raw-peer", 0b1, 0, b"hello\n")

# --- vsock_tx: see the table at the top of fuzz_targets/vsock_tx.rs ------------------------
GUEST_CID, HOST_CID = 3, 2
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = 1, 2, 3, 4, 5, 6, 7


def header(op, src_port=1000, dst_port=9009, length=0, src=GUEST_CID, dst=HOST_CID, type_=1, flags=0, buf_alloc=65536, fwd_cnt=0):
    return struct.pack("<QQIIIHHIII", src, dst, src_port, dst_port, length, type_, op, flags, buf_alloc, fwd_cnt)


def tx(hdr, payload=b"", shape=b"\x02"):
    """A tx packet step: tag 0, the header, a shape, the payload (shape 2: split)."""
    return b"\x00" + hdr + shape + struct.pack("<H", len(payload)) + payload


RX = b"\x03\x08"
PULSE_STEP = b"\x04"
DRAIN = b"\x06"


def rw(payload, port=1000, shape=b"\x01" + struct.pack("<HH", 44, 0) + b"\x00"):
    # Two descriptors: the header, then the payload (data_len 0 is fixed up below).
    if shape[:1] == b"\x01":
        shape = b"\x01" + struct.pack("<HH", 44, len(payload)) + b"\x00"
    return tx(header(OP_RW, src_port=port, length=len(payload)), payload, shape)


def vsock(name, cap, *steps):
    write("vsock_tx", name, bytes([cap]) + b"".join(steps))


vsock(
    "connect-beat-close",
    4,
    RX,
    tx(header(OP_REQUEST)),
    DRAIN,
    rw(b"WATCHDOG=1\n"),
    rw(b"CHECKPOINT=tick\nSTATUS=ok\n"),
    tx(header(OP_CREDIT_REQUEST)),
    RX,
    tx(header(OP_SHUTDOWN, flags=3)),
    DRAIN,
)
vsock(
    "pulses",
    2,
    RX,
    tx(header(OP_REQUEST, dst_port=9010)),
    DRAIN,
    PULSE_STEP,
    RX,
    tx(header(OP_CREDIT_UPDATE, dst_port=9010, fwd_cnt=27)),
    tx(header(OP_RST, dst_port=9010)),
    DRAIN,
)
vsock(
    "one-descriptor-and-cuts",
    8,
    RX,
    tx(header(OP_REQUEST, src_port=1001)),
    tx(header(OP_RW, src_port=1001, length=11), b"WATCHDOG=1\n", b"\x00\x00\x00"),
    tx(header(OP_RW, src_port=1001, length=22), b"CONDITION=ready=1\nabc\n", b"\x05\x03" + struct.pack("<HHH", 10, 44, 50)),
    DRAIN,
)
vsock(
    "lying-lengths",
    1,
    RX,
    tx(header(OP_REQUEST)),
    tx(header(OP_RW, length=0xFFFFFFFF), b"WATCHDOG=1\n"),
    tx(header(OP_RW, length=100), b"short"),
    tx(header(OP_RW, length=5), b"x", b"\x01" + struct.pack("<HH", 20, 5) + b"\x03"),
    DRAIN,
)
vsock(
    "hostile-chains",
    4,
    tx(header(OP_REQUEST), b"", b"\x03\x01" + struct.pack("<H", 44) + b"\x01\x01" + struct.pack("<H", 10) + b"\x01\x00"),
    tx(header(OP_REQUEST), b"", b"\x03\x00" + struct.pack("<H", 44) + b"\x04\x00"),
    tx(header(OP_REQUEST), b"", b"\x04" + struct.pack("<QI", 1 << 40, 44)),
    tx(header(OP_REQUEST, src=7, dst=9)),
    tx(header(9)),
    DRAIN,
)
vsock(
    "reboot",
    4,
    RX,
    tx(header(OP_REQUEST)),
    rw(b"WATCHDOG=1\n"),
    b"\x07\x00",
    b"\x07\x01",
    RX,
    tx(header(OP_REQUEST)),
    b"\x07\x00",
    b"\x07\x02",
    rw(b"WATCHDOG=1\n"),
    b"\x05",
    DRAIN,
)
