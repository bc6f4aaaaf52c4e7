// Package vm runs Go tests inside a qemu VM with a full Debian kernel: the
// "kernel suite". The build machines' kernel (6.18) has TCX but no kernel
// WireGuard, no ESP and no loadable modules. The suites boot two of Debian's
// linux-image-<ver>-cloud-amd64 kernels, one after the other (vmKernels in
// kernels_test.go; $MESHCRYPT_VM_KERNELS=6.12 runs one):
//
//   - 6.1, bookworm's (the machine's apt): wireguard.ko, esp4.ko, xfrm_user,
//     cls_bpf, sch_ingress, GCM and BTF, but no TCX: kernel WireGuard with
//     the legacy tc attach path.
//   - 6.12, trixie's ([KernelOptions.Release] "trixie"): the same modules,
//     xz-compressed, and TCX: kernel WireGuard with TCX, the combination most
//     production nodes run. Why trixie's and not bookworm-backports' 6.12
//     (6.12.95 when this was written): that build crashed at boot under
//     qemu 7.2's TCG in 3 to 4 of 10 boots (a general protection fault or a
//     double fault in the iretq of do_sync_core while text_poke patched a
//     static key: RFLAGS with NT set), with any -cpu model, -smp 1 and
//     thread=single alike; trixie's 6.12.118 booted 28 times out of 28.
//
// The guest learns what its kernel must give in $MESHCRYPT_VM_ATTACH
// ([AttachEnv]: "tc" on 6.1, "tcx" on 6.12); pkg/datapath's TCX probe and the
// e2e suites' MeshNode checks fail, not skip, when the kernel answers
// otherwise, and the TCX tests are in MustRun on 6.12.
//
// # Pieces
//
//   - [FetchKernel] asks apt which kernel linux-image-cloud-amd64 depends on,
//     downloads it once (apt-get download), unpacks it (dpkg-deb -x), runs
//     depmod, and caches it in ~/.cache/meshcrypt/vm/kernel/<package>_<version>.
//     For a kernel of another release (trixie's 6.12 on bookworm) apt runs
//     on a state of its own in ~/.cache/meshcrypt/vm/apt/<release> (that
//     release and its security suite from deb.debian.org, lists updated
//     daily and when a version has left the archive), so the machine's
//     sources never name a newer release. Without apt it falls back to the
//     newest cached kernel of the same series.
//   - [Build] compiles each [Test] package with `go test -c` (CGO_ENABLED=0,
//     static, stripped, in parallel; the Go build cache makes rebuilds cheap),
//     builds [Options.Programs] with `go build`, and writes the initramfs with
//     [Archive] (a newc writer: no cpio tool, entries owned by root, the same
//     bytes for the same inputs): busybox-static with every applet linked
//     (/sbin/modprobe included, so the kernel autoloads crypto and qdisc
//     modules), the modules of [DefaultModules] and [DefaultModuleDirs] with
//     their dependencies and a modules.dep made for exactly them
//     (compressed modules, 6.12's .ko.xz, decompressed on the host with xz,
//     zstd or gzip: busybox's modprobe hands a module to the kernel as it
//     is, and the guest would decompress in emulated time), host
//     programs with their shared libraries ([Options.HostPrograms]: iproute2's
//     ip for `ip netns exec`), each package's directory with its testdata
//     (binaries run there, as under go test), and /init. The archive is left
//     uncompressed: the guest kernel would spend emulated time on gunzip.
//   - [Boot] runs qemu-system-x86_64 with TCG (KVM fails on the build
//     machines), -cpu max, 2 vCPUs, 1 GiB, -no-reboot and panic=-1 (a guest
//     panic ends qemu), in its own process group, killed when the context or
//     [BootOptions.Timeout] (default 10 min) ends and, through Pdeathsig set
//     from a goroutine locked to its thread for qemu's lifetime, when the
//     test process dies. Boot-time files and environment (a kubeconfig for a
//     control plane started after Build) go into a second archive appended to
//     the initramfs.
//   - /init mounts proc, sysfs, devtmpfs, devpts, tmpfs on /run, /tmp and
//     /dev/shm (/var/run links to /run), bpffs on /sys/fs/bpf, cgroup2,
//     debugfs and tracefs; loads the modules; optionally configures eth0;
//     sets MESHCRYPT_VM=1; runs every test binary with -test.v=test2json,
//     -test.timeout and -test.count=1; and powers off.
//
// # Results
//
// The guest has two serial ports: ttyS0 is the kernel console, ttyS1 carries
// only the results. For each binary, /init writes a begin marker, the binary's
// output, and an end marker with its exit status and the guest uptime (see
// markerPrefix); markers carry a per-boot nonce from the kernel command line,
// so test output cannot forge one. The host parses the stream as it arrives
// (progress lines appear live), decodes each binary's output with
// `go tool test2json`, and [Result.Report] mirrors every inner test as a host
// subtest that passes, fails or skips as it did inside, with its output:
// `go test -v ./tests/vm/` shows
// TestKernelSuite/6.12/pkg/crypto/wireguard/TestKernelDevice. The suite fails when the
// VM does not boot, times out or panics, a module does not load, a binary exits
// non-zero without a failed test (a crash, a -test.timeout panic) or does not
// finish, or a test named in [Test.MustRun] skips or does not run: the tests
// the VM exists for must not skip there.
//
// Why a serial port and not a shared folder: the cloud kernel has no 9p
// (CONFIG_NET_9P is not set) and virtio-fs needs a virtiofsd daemon on the
// host; the 8250 UART is built in, needs nothing on either side, streams while
// tests run, and what a binary wrote before a guest crash has already reached
// the host. Test output is small (tens of kilobytes per package) next to what
// the emulated UART moves in a second.
//
// # End-to-end suites in the VM
//
// [BootOptions.Network] gives the guest eth0 on qemu's user network: 10.0.2.2
// is the host's loopback, so a kube-apiserver listening on the host's
// 127.0.0.1:PORT (tests/controlplane binds loopback only) is
// https://10.0.2.2:PORT from the guest, and a kubeconfig from
// ControlPlane.Kubeconfig for that server sets tls-server-name localhost,
// which the serving certificate names. The guest has no default route: nothing
// beyond the host is reachable.
//
// TestE2EInVM runs tests/e2e this way, once per kernel (TestE2EInVM/6.1,
// then TestE2EInVM/6.12), each boot with a control plane of its own. On the
// host it starts etcd and kube-apiserver, applies manifests/crds, rbac and
// admission
// (cluster.ApplyManifests, what cluster.Start applies to a control plane of
// its own), and builds an image with Tests tests/vm/internal/guestagent and
// tests/e2e, Programs cmd/meshcrypt-agent and cmd/meshcrypt, HostPrograms ip
// (netenv runs agents with `ip netns exec`). It boots it with Network, the
// admin kubeconfig for https://10.0.2.2:PORT as a boot file, and
// $MESHCRYPT_KUBECONFIG and $MESHCRYPT_BIN_DIR naming them. In the guest,
// tests/cluster sees $MESHCRYPT_KUBECONFIG and runs against that external
// control plane: it starts none, applies nothing, takes the API server's
// address for the node namespaces' forwarders from the kubeconfig's server,
// writes the agents' kubeconfigs from its CA and server name, and at Start
// deletes what the previous test's cluster left (meshcrypt.io objects, Nodes,
// Pods, Events, the agent namespace's Secrets), since every test of the boot
// shares the host's API server. Agent tokens (cluster.AgentToken) work
// unchanged over that connection. One VM runs one cluster at a time: the
// guest kernel is shared by every node namespace, as on the host.
//
// Which e2e tests run in the VM is the list e2eInVM at the top of
// e2e_test.go, less those e2eNotOn leaves out on a kernel with its reason
// (TestFaults on 6.12 for now): the binary runs only those ([Test.Run],
// built with [RunOnly]) and each is in [Test.MustRun], so none can skip there. In the VM the e2e
// tests expect the kernel's WireGuard and the kernel's attach mode
// (MESHCRYPT_VM=1: agents run --wireguard-backend kernel and must report
// backend kernel, and with --attach-mode auto the attach mode of
// $MESHCRYPT_VM_ATTACH, tc on 6.1 and tcx on 6.12, in their MeshNode
// status). Tests that stop or restart kube-apiserver or etcd skip there
// with "needs its own control plane"
// (cluster.NeedOwnControlPlane): the control plane is the host's, and the
// host's e2e run covers them. guestagent runs first in the same boot: two
// agents on kernel WireGuard and a ping through the tunnel, the quick check
// that the guest reaches the host's API server at all. After the boot the
// host reads the MeshNodes the VM's last cluster left in its etcd.
//
// Measured on the 2-core build machine under TCG, with other work on it: the
// VM reaches its first test 5-7 s after qemu starts (6.1; 6.12 10-15 s); in
// the guest TestWireGuardEndToEnd takes 14-21 s, TestStrict 18-27 s,
// TestPolicy 33-46 s, TestFaults 16-59 s (most of it 200 MeshNode writes
// while three agents and qemu share the host's two cores); TestE2EInVM
// 1m45s-3 min per kernel in all, and `go test ./tests/vm/` 2m45s-3m15s
// with 6.1 alone. With both kernels, on 2026-12-07 at load average 6-16
// (three other engineers' builds, tests and VMs): `make test-vm` 19m31s,
// of which TestE2EInVM 6m34s on 6.1 and 6m23s on 6.12 (the e2e binary
// 5m38s and 5m17s in the guest), TestKernelSuite 2m25s on 6.1 and 2m39s on
// 6.12 (in the guest on 6.12: pkg/crypto/wireguard 35 s, pkg/crypto/ipsec
// 32 s, pkg/datapath 60 s), the harness's own tests 1m15s.
//
// This package is test infrastructure: it must not import any meshcrypt
// package under pkg/ or cmd/ (its tests do), so the harness never depends on
// the code it tests. The Debian packages it needs (qemu-system-x86,
// busybox-static, kmod) are installed by hack/vm-deps.sh.
package vm
