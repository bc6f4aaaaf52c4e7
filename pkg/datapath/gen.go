package datapath

// The classifier's BPF object and its Go bindings are generated from bpf/classifier.c and
// committed, so `go build` needs no clang. Regenerating needs clang, llvm-strip and the
// kernel uapi and libbpf headers (Debian: clang llvm libbpf-dev linux-libc-dev).
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -mcpu=v3" -target bpfel -type ipcache_key -type ipcache_val -type policy_key -type policy_val -type enforce_key -type enforce_val -type metrics_val -type flow_cpu -type ct_key -type ct_entry classifier ../../bpf/classifier.c -- -I../../bpf/include
