"""What this machine is: memory, cores, architecture, GPUs, battery, device class, measured speed.

The bottom layer of the import graph: nothing here imports from `shards` or `mesh`, and nothing
needs more than the witness install (the standard library and psutil). One file per probe:

- probe.py         how probes reach the machine (a root directory, an environ, a command runner)
- cpu.py           /proc/cpuinfo: architecture, features that matter to llama.cpp, model name, cores
- memory.py        RAM total/available and what is left for model shards after the reserve
- gpus.py          NVIDIA (nvidia-smi), AMD (rocm-smi), Apple Silicon (sysctl on Darwin)
- battery.py       psutil.sensors_battery(), or termux-battery-status on Termux
- device_class.py  raspberry-pi / termux-phone / openwrt-router / desktop / server, and the board name
- speed.py         a short pure-Python benchmark, cached per process
- profile.py       composes them into the JSON dict recorded with each member in the Raft state
"""
