package guestagent

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/wireguard"
	"github.com/meshcrypt/meshcrypt/tests/netenv"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// apiPortInNode is where an agent finds the API server inside its node
// namespace: a forwarder to the host.
const apiPortInNode = 6443

// TestAgentsKernelWireGuard starts an agent on each of two netenv nodes,
// reaching the host's API server, and checks that both publish their
// MeshNode with the kernel backend and a ready peer, and that pods on the two
// nodes talk through kernel WireGuard.
func TestAgentsKernelWireGuard(t *testing.T) {
	if os.Getenv("MESHCRYPT_VM") != "1" {
		t.Skip("runs in the VM (tests/vm)")
	}
	kubeconfig := os.Getenv("MESHCRYPT_KUBECONFIG")
	agentBin := os.Getenv("MESHCRYPT_AGENT")
	if kubeconfig == "" || agentBin == "" {
		t.Skip("needs $MESHCRYPT_KUBECONFIG and $MESHCRYPT_AGENT from the host")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 4*time.Minute)
	defer cancel()

	admin, err := clientcmd.LoadFromFile(kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	restCfg, err := clientcmd.NewDefaultClientConfig(*admin, nil).ClientConfig()
	if err != nil {
		t.Fatal(err)
	}
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	c, err := client.New(restCfg, client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}
	// The host's API server, as this namespace (the VM's) reaches it.
	apiTarget := strings.TrimPrefix(restCfg.Host, "https://")
	mc := &v1alpha1.MeshConfig{ObjectMeta: metav1.ObjectMeta{Name: v1alpha1.MeshConfigName}}
	if _, err := controllerutil.CreateOrUpdate(ctx, c, mc, func() error {
		mc.Spec.Encryption.Mode = v1alpha1.ModeWireGuard
		return nil
	}); err != nil {
		t.Fatalf("MeshConfig: %v", err)
	}

	podMTU := wireguard.TunnelMTU(1500)
	topo := netenv.NewT(t, netenv.Options{Prefix: "vm", PodMTU: podMTU})
	work := t.TempDir()
	// Agents pin their classifier on a bpffs of their own, as tests/cluster
	// has them do: ip netns exec remounts /sys, which hides /sys/fs/bpf.
	bpfDir := filepath.Join(work, "bpf")
	if err := os.Mkdir(bpfDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("bpf", bpfDir, "bpf", 0, "mode=700"); err != nil {
		t.Fatalf("mount bpffs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(bpfDir, unix.MNT_DETACH) })
	type node struct {
		nn    *netenv.Node
		pod   *netenv.Pod
		iface string
		log   string
		done  chan struct{} // closed when the agent exits
		err   error         // its exit, once done is closed
	}
	var nodes []*node
	for i, name := range []string{"vm-a", "vm-b"} {
		nn, err := topo.AddNode(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		pod, err := topo.AddPod(ctx, nn, "p")
		if err != nil {
			t.Fatal(err)
		}
		n := &node{nn: nn, pod: pod, iface: "mcvm" + strconv.Itoa(i+1), log: filepath.Join(work, name+".log"), done: make(chan struct{})}
		nodes = append(nodes, n)
		createNode(ctx, t, c, nn)
		if _, err := nn.NS.ForwardTCP(ctx, fmt.Sprintf("127.0.0.1:%d", apiPortInNode), apiTarget); err != nil {
			t.Fatal(err)
		}
		kc := filepath.Join(work, name+".kubeconfig")
		writeNodeKubeconfig(t, admin, kc)
		logf, err := os.Create(n.log)
		if err != nil {
			t.Fatal(err)
		}
		cmd := nn.NS.Command(context.Background(), agentBin, "--kubeconfig", kc, "--node-name", name,
			"--state-dir", filepath.Join(work, name), "--wireguard-iface", n.iface,
			"--wireguard-backend", "kernel", "--bpf-pin-dir", bpfDir, "--status-period", "1s")
		cmd.Stdout, cmd.Stderr = logf, logf
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { n.err = cmd.Wait(); close(n.done) }()
		t.Cleanup(func() {
			cmd.Process.Signal(os.Interrupt)
			select {
			case <-n.done:
			case <-time.After(10 * time.Second):
				cmd.Process.Kill()
				<-n.done
			}
			logf.Close()
			if t.Failed() {
				b, _ := os.ReadFile(n.log)
				t.Logf("agent log of %s:\n%s", name, b)
			}
		})
	}

	start := time.Now()
	var last string
	for {
		var list v1alpha1.MeshNodeList
		if err := c.List(ctx, &list); err != nil {
			last = err.Error()
		} else {
			last = ""
			ready := 0
			for _, mn := range list.Items {
				st := mn.Status
				last += fmt.Sprintf("%s: mode %q backend %q peers ready %d; ", mn.Name, st.Mode, st.Backend, st.PeersReady)
				if st.Mode == v1alpha1.ModeWireGuard && st.Backend == v1alpha1.BackendKernel && st.PeersReady == 1 {
					ready++
				}
			}
			if ready == len(nodes) {
				break
			}
		}
		for _, n := range nodes {
			select {
			case <-n.done:
				t.Fatalf("the agent of %s exited: %v", n.nn.Name, n.err)
			default:
			}
		}
		if ctx.Err() != nil {
			t.Fatalf("MeshNodes not ready with the kernel backend: %s", last)
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Logf("both agents ready on kernel WireGuard %s after start: %s", time.Since(start).Round(time.Millisecond), last)

	// Full-size packets between the pods, both ways, through the tunnel.
	for _, p := range [][2]*node{{nodes[0], nodes[1]}, {nodes[1], nodes[0]}} {
		for _, dst := range p[1].pod.Addrs() {
			pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			err := p[0].pod.NS.Ping(pctx, dst, podMTU)
			cancel()
			if err != nil {
				t.Errorf("ping %s -> %s (%d bytes): %v", p[0].pod.Name, dst, podMTU, err)
			}
		}
	}
	for _, n := range nodes {
		var dev *wgtypes.Device
		err := n.nn.NS.Do(func() error {
			wc, err := wgctrl.New()
			if err != nil {
				return err
			}
			defer wc.Close()
			dev, err = wc.Device(n.iface)
			return err
		})
		if err != nil {
			t.Fatalf("read %s in %s: %v", n.iface, n.nn.Name, err)
		}
		if dev.Type != wgtypes.LinuxKernel || len(dev.Peers) != 1 || dev.Peers[0].ReceiveBytes == 0 || dev.Peers[0].LastHandshakeTime.IsZero() {
			t.Errorf("%s on %s: type %s, peers %+v; want a kernel device whose one peer has handshaken and sent data", n.iface, n.nn.Name, dev.Type, dev.Peers)
		} else {
			t.Logf("%s on %s: %s, peer received %d bytes, sent %d", n.iface, n.nn.Name, dev.Type, dev.Peers[0].ReceiveBytes, dev.Peers[0].TransmitBytes)
		}
	}
}

// createNode creates the Kubernetes Node of nn with its pod CIDRs and
// underlay addresses, as tests/cluster does.
func createNode(ctx context.Context, t *testing.T, c client.Client, nn *netenv.Node) {
	t.Helper()
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: nn.Name, Labels: map[string]string{"kubernetes.io/hostname": nn.Name}}}
	for _, p := range nn.PodCIDRs {
		node.Spec.PodCIDRs = append(node.Spec.PodCIDRs, p.String())
	}
	node.Spec.PodCIDR = node.Spec.PodCIDRs[0]
	if err := c.Create(ctx, node); err != nil {
		t.Fatalf("create Node %s: %v", nn.Name, err)
	}
	node.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeHostName, Address: nn.Name}}
	for _, ip := range []netip.Addr{nn.UnderlayV4, nn.UnderlayV6} {
		if ip.IsValid() {
			node.Status.Addresses = append(node.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: ip.String()})
		}
	}
	node.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady",
		LastHeartbeatTime: metav1.Now(), LastTransitionTime: metav1.Now()}}
	if err := c.Status().Update(ctx, node); err != nil {
		t.Fatalf("set Node %s status: %v", nn.Name, err)
	}
}

// writeNodeKubeconfig writes admin's kubeconfig pointed at the forwarder in
// the node's namespace. The API server's certificate does not name
// 127.0.0.1:6443's other side, but it names localhost.
func writeNodeKubeconfig(t *testing.T, admin *clientcmdapi.Config, path string) {
	t.Helper()
	cfg := admin.DeepCopy()
	for _, cl := range cfg.Clusters {
		cl.Server = fmt.Sprintf("https://127.0.0.1:%d", apiPortInNode)
		cl.TLSServerName = "localhost"
	}
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		t.Fatal(err)
	}
}
