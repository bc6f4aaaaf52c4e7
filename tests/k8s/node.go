package k8s

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// nodeTmpfs are the host paths every node gets a private, empty tmpfs over, inside its mount
// namespace: without them the kubelets and containerds of different nodes collide on host paths
// (pod volumes, CNI IPAM state, container logs, shim sockets) even with every path flag set, and
// the agents' hostPath volumes (private key, UAPI sockets) would be shared between nodes.
var nodeTmpfs = []string{
	"/run/containerd", "/var/lib/kubelet", "/var/lib/cni", "/var/log/containers", "/var/log/pods",
	"/var/lib/meshcrypt", "/run/wireguard",
}

// cgroupRoot is the directory of cgroup hierarchies.
const cgroupRoot = "/sys/fs/cgroup"

// startNode brings one node up: its mount namespace and cgroup, containerd with the images,
// the kubelet, the CNI configuration once the node has a pod CIDR, and kube-proxy.
func (c *Cluster) startNode(ctx context.Context, n *Node, images []string) error {
	t0 := time.Now()
	for _, d := range []string{"cni", "containerd", "logs"} {
		if err := os.MkdirAll(filepath.Join(n.dir, d), 0o755); err != nil {
			return err
		}
	}
	if err := c.makeMountNS(ctx, n); err != nil {
		return err
	}
	if err := makeCgroup(n.cgroup); err != nil {
		return err
	}
	sysctls := []string{"net.ipv4.ip_forward=1", "net.ipv4.conf.all.forwarding=1"}
	if n.CNI == Bridge {
		sysctls = append(sysctls, "net.bridge.bridge-nf-call-iptables=1")
	}
	for _, kv := range sysctls {
		if err := run(ctx, "nsenter", "--net="+n.NS.Path, "sysctl", "-qw", kv); err != nil {
			return err
		}
	}
	if err := c.startContainerd(ctx, n); err != nil {
		return err
	}
	for _, im := range images {
		if err := importImage(ctx, "ctr", n.ContainerdSocket(), im); err != nil {
			return err
		}
	}
	if err := c.startKubelet(n); err != nil {
		return err
	}
	if err := c.waitPodCIDR(ctx, n); err != nil {
		return err
	}
	if err := writeCNIConfig(n); err != nil {
		return err
	}
	if err := c.startKubeProxy(n); err != nil {
		return err
	}
	c.log.Info("node started", "node", n.Name, "cni", n.CNI, "ip", n.IP, "pod_cidr", n.PodCIDR, "elapsed", time.Since(t0).Round(time.Millisecond))
	return nil
}

// nsenter returns argv run inside the node's network and mount namespaces.
func (n *Node) nsenter(argv ...string) []string {
	return append([]string{"nsenter", "--net=" + n.NS.Path, "--mount=" + n.mnt, "--"}, argv...)
}

// makeMountNS creates the node's mount namespace, a slave of the host's (host mounts still
// appear in it, its own never leak out) that is itself shared, so that mounts made by containers
// with Bidirectional propagation (the agent's bpffs) reach the node and its other containers;
// with a tmpfs over each of nodeTmpfs. It is kept alive by a bind mount at n.mnt.
func (c *Cluster) makeMountNS(ctx context.Context, n *Node) error {
	f, err := os.Create(n.mnt)
	if err != nil {
		return err
	}
	f.Close()
	var script strings.Builder
	// The other nodes' mount namespace files were copied into this one: drop the copies, so
	// that no namespace pins another.
	fmt.Fprintf(&script, "umount -l %s 2>/dev/null || true\n", filepath.Dir(n.mnt))
	script.WriteString("mount --make-rshared /\n")
	for _, d := range nodeTmpfs {
		fmt.Fprintf(&script, "mkdir -p %[1]s && mount -t tmpfs -o mode=0755 tmpfs %[1]s\n", d)
	}
	return run(ctx, "unshare", "--mount="+n.mnt, "--propagation", "slave", "--", "sh", "-ec", script.String())
}

// cgroupHierarchies returns the cgroup mount points under /sys/fs/cgroup (every v1 hierarchy,
// and the unified one of a hybrid setup).
func cgroupHierarchies() ([]string, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		pre, post, ok := strings.Cut(l, " - ")
		if !ok {
			continue
		}
		f, pf := strings.Fields(pre), strings.Fields(post)
		if len(f) < 5 || len(pf) < 1 || (pf[0] != "cgroup" && pf[0] != "cgroup2") {
			continue
		}
		if strings.HasPrefix(f[4], cgroupRoot+"/") || f[4] == cgroupRoot {
			out = append(out, f[4])
		}
	}
	if len(out) == 0 {
		return nil, errors.New("no cgroup hierarchy mounted under " + cgroupRoot)
	}
	return out, nil
}

// makeCgroup creates the cgroup name in every hierarchy (the kubelet's cgroupRoot), with the
// parent's cpus and memory nodes in the cpuset one (a new cpuset cgroup starts with none).
func makeCgroup(name string) error {
	hs, err := cgroupHierarchies()
	if err != nil {
		return err
	}
	for _, h := range hs {
		d := filepath.Join(h, name)
		if err := os.Mkdir(d, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("create cgroup %s: %w", d, err)
		}
		for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
			v, err := os.ReadFile(filepath.Join(h, f))
			if err != nil {
				continue // not the cpuset hierarchy
			}
			if err := os.WriteFile(filepath.Join(d, f), v, 0o644); err != nil {
				return fmt.Errorf("cgroup %s: %s: %w", d, f, err)
			}
		}
	}
	return nil
}

// killCgroup sends SIGKILL to every process in the cgroup name (and below) of every hierarchy
// until none is left, then removes the cgroups, deepest first, retrying while the kernel still
// counts exiting tasks.
func killCgroup(ctx context.Context, name string) error {
	hs, err := cgroupHierarchies()
	if err != nil {
		return err
	}
	var last error
	for {
		var pids []int
		for _, h := range hs {
			_ = filepath.WalkDir(filepath.Join(h, name), func(p string, d os.DirEntry, err error) error {
				if err != nil || d.IsDir() || d.Name() != "cgroup.procs" {
					return nil
				}
				b, _ := os.ReadFile(p)
				for _, f := range strings.Fields(string(b)) {
					var pid int
					if _, err := fmt.Sscan(f, &pid); err == nil && pid > 0 {
						pids = append(pids, pid)
					}
				}
				return nil
			})
		}
		if len(pids) == 0 {
			break
		}
		for _, pid := range pids {
			_ = killPid(pid)
		}
		if err := sleepCtx(ctx, 50*time.Millisecond); err != nil {
			return fmt.Errorf("kill cgroup %s: pids %v left: %w", name, pids, err)
		}
	}
	for {
		last = nil
		for _, h := range hs {
			var dirs []string
			_ = filepath.WalkDir(filepath.Join(h, name), func(p string, d os.DirEntry, err error) error {
				if err == nil && d.IsDir() {
					dirs = append(dirs, p)
				}
				return nil
			})
			for i := len(dirs) - 1; i >= 0; i-- {
				if err := os.Remove(dirs[i]); err != nil && !errors.Is(err, os.ErrNotExist) {
					last = err
				}
			}
		}
		if last == nil {
			return nil
		}
		if err := sleepCtx(ctx, 100*time.Millisecond); err != nil {
			return fmt.Errorf("remove cgroup %s: %w (%w)", name, last, err)
		}
	}
}

// startContainerd writes the node's containerd configuration and starts it in the node's
// namespaces, then waits until it answers.
func (c *Cluster) startContainerd(ctx context.Context, n *Node) error {
	cfg := fmt.Sprintf(`version = 2
root = %[1]q
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = %[2]q

[ttrpc]
  address = %[3]q

[plugins."io.containerd.internal.v1.opt"]
  path = %[4]q

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %[5]q
  # The sandbox lacks CAP_SYS_RESOURCE: without this every sandbox fails with
  # "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = %[6]q
`, filepath.Join(n.dir, "containerd", "root"), n.ContainerdSocket(), n.ContainerdSocket()+".ttrpc",
		filepath.Join(n.dir, "containerd", "opt"), PauseImage, filepath.Join(n.dir, "cni"))
	path := filepath.Join(n.dir, "containerd.toml")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		return err
	}
	var err error
	n.containerd, err = startProc("containerd "+n.Name, n.nsenter("containerd", "--config", path),
		filepath.Join(c.dir, "logs", n.Name+"-containerd.log"))
	if err != nil {
		return err
	}
	var last string
	deadline := time.Now().Add(processTimeout)
	for {
		if n.containerd.exited() {
			return n.containerd.exitError()
		}
		out, err := exec.CommandContext(ctx, "ctr", "-a", n.ContainerdSocket(), "version").CombinedOutput()
		if err == nil {
			return nil
		}
		last = strings.TrimSpace(string(out))
		if time.Now().After(deadline) {
			return fmt.Errorf("containerd on %s does not answer (%s)", n.Name, last)
		}
		if err := sleepCtx(ctx, pollInterval); err != nil {
			return fmt.Errorf("containerd on %s: %w (%s)", n.Name, err, last)
		}
	}
}

// startKubelet writes the node's kubeconfig and kubelet configuration and starts the kubelet.
func (c *Cluster) startKubelet(n *Node) error {
	kc := filepath.Join(n.dir, "kubelet.kubeconfig")
	if err := c.CP.WriteKubeconfig(kc, c.CP.URL(), c.CP.Token("system:node:"+n.Name)); err != nil {
		return err
	}
	cfg := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: %[1]s
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
# The API server reaches the kubelet (logs, exec) without a client certificate here.
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
containerRuntimeEndpoint: unix://%[2]s
cgroupDriver: cgroupfs
cgroupRoot: /%[3]s
failCgroupV1: false
failSwapOn: false
clusterDomain: cluster.local
resolvConf: %[4]s
serializeImagePulls: false
# A developer machine's disk: never evict the test's pods for it.
evictionHard:
  memory.available: "50Mi"
  nodefs.available: "1%%"
  nodefs.inodesFree: "1%%"
  imagefs.available: "1%%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
nodeStatusUpdateFrequency: 4s
syncFrequency: 10s
fileCheckFrequency: 10s
`, n.IP, n.ContainerdSocket(), n.cgroup, filepath.Join(n.dir, "resolv.conf"))
	path := filepath.Join(n.dir, "kubelet.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		return err
	}
	// Pods get no DNS: nothing here resolves cluster names, and the host's resolvers are not
	// the test's to use.
	if err := os.WriteFile(filepath.Join(n.dir, "resolv.conf"), []byte("options ndots:1\n"), 0o644); err != nil {
		return err
	}
	var err error
	n.kubelet, err = startProc("kubelet "+n.Name, n.nsenter(c.bins["kubelet"],
		"--config="+path,
		"--kubeconfig="+kc,
		"--hostname-override="+n.Name,
		"--node-ip="+n.IP.String(),
		"--v=1",
	), filepath.Join(c.dir, "logs", n.Name+"-kubelet.log"))
	return err
}

// writeCNIConfig writes the node's CNI configuration for its pod CIDR; containerd picks it up
// (and the kubelet reports the network ready) within seconds.
func writeCNIConfig(n *Node) error {
	ipam := fmt.Sprintf(`{"type": "host-local", "ranges": [[{"subnet": %q}]], "routes": [{"dst": "0.0.0.0/0"}]}`, n.PodCIDR)
	var plugin string
	switch n.CNI {
	case PTP:
		plugin = fmt.Sprintf(`{"type": "ptp", "ipMasq": false, "ipam": %s}`, ipam)
	case Bridge:
		plugin = fmt.Sprintf(`{"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true, "ipam": %s}`, ipam)
	default:
		return fmt.Errorf("CNI %q: want %s or %s", n.CNI, PTP, Bridge)
	}
	conf := fmt.Sprintf(`{"cniVersion": "0.4.0", "name": "k8s-pod-network", "plugins": [%s, {"type": "portmap", "capabilities": {"portMappings": true}}]}`, plugin)
	tmp := filepath.Join(n.dir, "cni", ".10-pods.conflist")
	if err := os.WriteFile(tmp, []byte(conf+"\n"), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(n.dir, "cni", "10-pods.conflist"))
}

// startKubeProxy starts kube-proxy in iptables mode on the node. It leaves the global
// conntrack settings alone.
func (c *Cluster) startKubeProxy(n *Node) error {
	kc := filepath.Join(n.dir, "kube-proxy.kubeconfig")
	if err := c.CP.WriteKubeconfig(kc, c.CP.URL(), c.CP.Token("system:kube-proxy")); err != nil {
		return err
	}
	cfg := fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: %[1]s
mode: iptables
clusterCIDR: %[2]s
hostnameOverride: %[3]s
bindAddress: %[4]s
healthzBindAddress: %[5]s
metricsBindAddress: 127.0.0.1:10249
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
`, kc, c.ClusterCIDR, n.Name, n.IP, net.JoinHostPort(n.IP.String(), "10256"))
	path := filepath.Join(n.dir, "kube-proxy.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		return err
	}
	var err error
	n.proxy, err = startProc("kube-proxy "+n.Name, n.nsenter(c.bins["kube-proxy"], "--config="+path, "--v=1"),
		filepath.Join(c.dir, "logs", n.Name+"-kube-proxy.log"))
	return err
}

// alive returns an error naming the first of the node's processes that exited.
func (n *Node) alive() error {
	for _, p := range []*proc{n.containerd, n.kubelet, n.proxy} {
		if p != nil && p.exited() {
			return p.exitError()
		}
	}
	return nil
}

// stopNode tears one node down in order: kubelet, its containers (by cgroup), their shims,
// kube-proxy, containerd, its mount namespace, its cgroups. The network namespace goes with the
// topology.
func (c *Cluster) stopNode(ctx context.Context, n *Node) error {
	var errs []error
	n.kubelet.stop(stopGrace)
	errs = append(errs, killCgroup(ctx, n.cgroup))
	errs = append(errs, killMentioning(ctx, n.ContainerdSocket()))
	n.proxy.stop(stopGrace)
	n.containerd.stop(stopGrace)
	if err := exec.CommandContext(ctx, "umount", "-l", n.mnt).Run(); err != nil {
		if _, statErr := os.Stat(n.mnt); statErr == nil {
			errs = append(errs, fmt.Errorf("unmount %s: %w", n.mnt, err))
		}
	}
	return errors.Join(errs...)
}

// ipNet converts a prefix to a *net.IPNet for netlink.
func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// NodeIPs returns the nodes' underlay addresses.
func (c *Cluster) NodeIPs() []netip.Addr {
	var out []netip.Addr
	for _, n := range c.Nodes {
		out = append(out, n.IP)
	}
	return out
}
