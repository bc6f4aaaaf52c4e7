package k8s_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/dynamic"

	"github.com/meshcrypt/meshcrypt/tests/cluster"
	"github.com/meshcrypt/meshcrypt/tests/k8s"
	"github.com/meshcrypt/meshcrypt/tests/netenv"
)

// Bounds of the waits in this test.
const (
	agentsReadyTimeout = 3 * time.Minute
	podsReadyTimeout   = 2 * time.Minute
	cliTimeout         = 3 * time.Minute
	wireguardPort      = 51871 // the install manifest's --wireguard-port
	exchangesPerWay    = 5
)

const installManifest = "manifests/install/meshcrypt.yaml"

// TestInstall installs meshcrypt on a real cluster exactly as a user would, from the
// unchanged install manifest and the image built from this repository, and proves the
// encryption on the wire with pods the kubelets made: a ptp node's pod and a bridge node's
// pod exchange a marker over TCP, both ways, and the ptp pod through a ClusterIP Service
// (kube-proxy) with the bridge pod; the underlay capture must not show the marker with
// WireGuard and must show every copy of it with mode Disabled (the positive control).
func TestInstall(t *testing.T) {
	ctx := t.Context()
	root := moduleRoot(t)
	bins, err := cluster.Binaries(ctx, "", t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	manifest := filepath.Join(root, installManifest)
	ref := agentImageRef(t, manifest)
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))

	t0 := time.Now()
	var dir string
	t.Cleanup(func() { checkNothingLeft(t, dir) }) // runs after the cluster's Close
	c := k8s.StartT(t, k8s.Options{Images: []k8s.Image{k8s.AgentImage(ref, bins)}, Logger: log})
	dir = c.Dir()
	t.Logf("FIGURE cluster up (control plane, %d nodes Ready): %v", len(c.Nodes), time.Since(t0).Round(time.Millisecond))
	t.Cleanup(func() {
		if t.Failed() {
			dumpState(t, c)
		}
	})
	ptp, bridge := c.Node("ptp-1"), c.Node("bridge-1")
	if ptp == nil || bridge == nil {
		t.Fatal("want nodes ptp-1 and bridge-1")
	}

	// Install exactly as a user would: kubectl apply of the unchanged manifest.
	t1 := time.Now()
	if out, err := c.Kubectl(ctx, "apply", "-f", manifest); err != nil {
		t.Fatal(err)
	} else {
		t.Logf("kubectl apply:\n%s", bytes.TrimSpace(out))
	}
	waitAgentsReady(t, c)
	t.Logf("FIGURE agents Ready on every node after kubectl apply: %v", time.Since(t1).Round(time.Millisecond))
	waitMeshNodes(t, c)
	t.Logf("FIGURE cluster memory (RSS of every process of the cluster, agents and pods included): %d MiB", c.MemoryRSS()>>20)

	cli := func(args ...string) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(ctx, cliTimeout)
		defer cancel()
		cmd := exec.CommandContext(ctx, filepath.Join(bins, "meshcrypt"), append([]string{"--kubeconfig", c.Kubeconfig}, args...)...)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("meshcrypt %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		t.Logf("meshcrypt %s:\n%s", strings.Join(args, " "), bytes.TrimSpace(out))
		return string(out)
	}
	cli("encryption", "enable", "--mode", "wireguard", "--wait")
	cli("status")
	cli("verify", "--all-pairs")

	// Pods the kubelets make, placed by the scheduler on a ptp node and a bridge node.
	podA := startEchoPod(t, c, "echo-ptp", ptp.Name)
	podB := startEchoPod(t, c, "echo-bridge", bridge.Name)
	t.Logf("pods: %s on %s (%s), %s on %s (%s)", podA.Name, ptp.Name, podA.Status.PodIP, podB.Name, bridge.Name, podB.Status.PodIP)
	for _, p := range []struct {
		pod  *corev1.Pod
		node *k8s.Node
	}{{podA, ptp}, {podB, bridge}} {
		ip := netip.MustParseAddr(p.pod.Status.PodIP)
		if !p.node.PodCIDR.Contains(ip) {
			t.Fatalf("pod %s has IP %s outside its node's podCIDR %s", p.pod.Name, ip, p.node.PodCIDR)
		}
	}

	// A ClusterIP Service in front of the bridge node's pod: the ptp node's kube-proxy
	// translates it, and the translated packets must take the tunnel like any other.
	svcIP := startService(t, c, podB)
	t.Logf("service echo-bridge: %s -> %s", svcIP, podB.Status.PodIP)
	flows := []flow{
		{ptp, podA, net.JoinHostPort(podB.Status.PodIP, "7000")},
		{bridge, podB, net.JoinHostPort(podA.Status.PodIP, "7000")},
		{ptp, podA, net.JoinHostPort(svcIP, "7000")},
	}

	t.Run("WireGuard", func(t *testing.T) {
		frames, markers, wg := exchangeUnderCapture(t, c, flows)
		t.Logf("underlay: %d frames, %d WireGuard (udp/%d), marker in clear in %d", frames, wg, wireguardPort, markers)
		if markers != 0 {
			t.Errorf("marker seen in clear on the underlay in %d frames with WireGuard on", markers)
		}
		if wg == 0 {
			t.Errorf("no WireGuard frames (udp/%d) on the underlay: the exchange did not go through the tunnel", wireguardPort)
		}
	})
	cli("encryption", "disable", "--wait")
	t.Run("DisabledPositiveControl", func(t *testing.T) {
		frames, markers, wg := exchangeUnderCapture(t, c, flows)
		t.Logf("underlay: %d frames, %d WireGuard (udp/%d), marker in clear in %d", frames, wg, wireguardPort, markers)
		// Every exchange carries the marker twice on the wire (request and echo): all must be
		// seen, or the capture misses frames and the WireGuard subtest proves nothing.
		if want := len(flows) * exchangesPerWay * 2; markers < want {
			t.Errorf("marker seen in clear in %d frames with encryption disabled, want at least %d: the capture does not see the pod traffic", markers, want)
		}
	})
	t.Logf("FIGURE test total: %v", time.Since(t0).Round(time.Millisecond))
}

// flow is one direction of the test traffic: a pod (on node) asks to exchange a marker with
// an address (another pod, or a Service).
type flow struct {
	node *k8s.Node
	from *corev1.Pod
	to   string
}

// exchangeUnderCapture captures the underlay while, exchangesPerWay times for each flow, the
// flow's pod exchanges a fresh marker over TCP with the flow's address. It returns the frames
// seen, the frames carrying the marker and the WireGuard frames.
func exchangeUnderCapture(t *testing.T, c *k8s.Cluster, flows []flow) (frames, markers, wg int) {
	t.Helper()
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	marker := []byte("MESHCRYPT-K8S-MARKER-" + hex.EncodeToString(b[:]))
	capt, err := c.Capture(netenv.CaptureOptions{Markers: [][]byte{marker}})
	if err != nil {
		t.Fatal(err)
	}
	defer capt.Stop()
	for i := range exchangesPerWay {
		for _, f := range flows {
			if err := dialVia(t.Context(), f.node, f.from, f.to, marker); err != nil {
				t.Fatalf("exchange %d %s -> %s: %v", i, f.from.Name, f.to, err)
			}
		}
	}
	if err := capt.Stop(); err != nil {
		t.Fatal(err)
	}
	st := capt.Stats()
	if st.KernelDrops != 0 {
		t.Fatalf("capture: the kernel dropped %d frames", st.KernelDrops)
	}
	return st.Frames, capt.Count(marker), capt.UDPFrames(wireguardPort)
}

// startService creates a ClusterIP Service for pod's TCP echo port and waits until pods can
// use it (kube-proxy has programmed it): it returns the cluster IP.
func startService(t *testing.T, c *k8s.Cluster, pod *corev1.Pod) string {
	t.Helper()
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: pod.Name, Namespace: "default"},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"echo": pod.Name},
			Ports:    []corev1.ServicePort{{Name: "tcp", Port: 7000, TargetPort: intstrFromInt(7000), Protocol: corev1.ProtocolTCP}},
		},
	}
	got, err := c.Client.CoreV1().Services("default").Create(t.Context(), svc, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create service: %v", err)
	}
	ip := got.Spec.ClusterIP
	// Through every node's kube-proxy: from a pod on each node.
	pods, err := c.Client.CoreV1().Pods("default").List(t.Context(), metav1.ListOptions{LabelSelector: "app=echo"})
	if err != nil {
		t.Fatal(err)
	}
	for i := range pods.Items {
		p := &pods.Items[i]
		var last error
		err := wait.PollUntilContextTimeout(t.Context(), 250*time.Millisecond, podsReadyTimeout, true, func(ctx context.Context) (bool, error) {
			last = dialVia(ctx, c.Node(p.Spec.NodeName), p, net.JoinHostPort(ip, "7000"), []byte("service-probe"))
			return last == nil, nil
		})
		if err != nil {
			t.Fatalf("service %s (%s) from pod %s (%v): %v", svc.Name, ip, p.Name, last, err)
		}
	}
	return ip
}

// dialVia asks pod from (through its /dial endpoint, from its own node's namespace, so the
// request never crosses the underlay) to send payload to the TCP echo server at to and checks
// that the echo came back unchanged.
func dialVia(ctx context.Context, node *k8s.Node, from *corev1.Pod, to string, payload []byte) error {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			return node.NS.DialTCP(ctx, addr)
		},
		DisableKeepAlives: true,
	}}
	url := fmt.Sprintf("http://%s/dial?addr=%s&hex=%s",
		net.JoinHostPort(from.Status.PodIP, "8080"), to, hex.EncodeToString(payload))
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("GET /dial: %w", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET /dial: %s: %s", resp.Status, bytes.TrimSpace(body))
	}
	if got := strings.TrimSpace(string(body)); got != hex.EncodeToString(payload) {
		return fmt.Errorf("echo %q, want %x", got, payload)
	}
	return nil
}

// startEchoPod creates a pod running the workload image on node (through the scheduler: a
// nodeSelector on the hostname label) and waits until it is Ready.
func startEchoPod(t *testing.T, c *k8s.Cluster, name, node string) *corev1.Pod {
	t.Helper()
	ctx := t.Context()
	probe := &corev1.Probe{
		ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/healthz", Port: intstrFromInt(8080)}},
		PeriodSeconds: 1,
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", Labels: map[string]string{"app": "echo", "echo": name}},
		Spec: corev1.PodSpec{
			NodeSelector:                  map[string]string{"kubernetes.io/hostname": node},
			TerminationGracePeriodSeconds: new(int64),
			Containers: []corev1.Container{{
				Name:            "echo",
				Image:           k8s.WorkloadImage,
				ImagePullPolicy: corev1.PullNever,
				Ports: []corev1.ContainerPort{
					{Name: "tcp", ContainerPort: 7000, Protocol: corev1.ProtocolTCP},
					{Name: "udp", ContainerPort: 7001, Protocol: corev1.ProtocolUDP},
					{Name: "http", ContainerPort: 8080, Protocol: corev1.ProtocolTCP},
				},
				ReadinessProbe: probe,
			}},
		},
	}
	if _, err := c.Client.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create pod %s: %v", name, err)
	}
	var got *corev1.Pod
	var last string
	err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, podsReadyTimeout, true, func(ctx context.Context) (bool, error) {
		p, err := c.Client.CoreV1().Pods("default").Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			last = err.Error()
			return false, nil
		}
		got = p
		last = podSummary(p)
		return p.Spec.NodeName == node && podReady(p) && p.Status.PodIP != "", nil
	})
	if err != nil {
		t.Fatalf("pod %s not Ready on %s (%s): %v", name, node, last, err)
	}
	return got
}

// waitAgentsReady waits until the agent DaemonSet has a Ready pod on every node.
func waitAgentsReady(t *testing.T, c *k8s.Cluster) {
	t.Helper()
	var last string
	err := wait.PollUntilContextTimeout(t.Context(), 250*time.Millisecond, agentsReadyTimeout, true, func(ctx context.Context) (bool, error) {
		pods, err := c.Client.CoreV1().Pods("meshcrypt").List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=agent"})
		if err != nil {
			last = err.Error()
			return false, nil
		}
		ready := map[string]bool{}
		var states []string
		for i := range pods.Items {
			p := &pods.Items[i]
			states = append(states, p.Name+"@"+p.Spec.NodeName+": "+podSummary(p))
			if podReady(p) {
				ready[p.Spec.NodeName] = true
			}
		}
		last = strings.Join(states, "; ")
		for _, n := range c.Nodes {
			if !ready[n.Name] {
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		t.Fatalf("agents not Ready on every node (%s): %v", last, err)
	}
}

var meshNodes = schema.GroupVersionResource{Group: "meshcrypt.io", Version: "v1alpha1", Resource: "meshnodes"}

// waitMeshNodes waits until every node's agent has published its MeshNode (with a WireGuard
// public key) and reports it Ready.
func waitMeshNodes(t *testing.T, c *k8s.Cluster) {
	t.Helper()
	dyn, err := dynamic.NewForConfig(c.CP.RESTConfig())
	if err != nil {
		t.Fatal(err)
	}
	var last string
	err = wait.PollUntilContextTimeout(t.Context(), 250*time.Millisecond, agentsReadyTimeout, true, func(ctx context.Context) (bool, error) {
		for _, n := range c.Nodes {
			mn, err := dyn.Resource(meshNodes).Get(ctx, n.Name, metav1.GetOptions{})
			if err != nil {
				last = err.Error()
				return false, nil
			}
			key, _, _ := unstructuredString(mn.Object, "spec", "wireguard", "publicKey")
			if key == "" {
				last = n.Name + ": no WireGuard public key"
				return false, nil
			}
			if !conditionTrue(mn.Object, "Ready") {
				last = n.Name + ": not Ready"
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		t.Fatalf("MeshNodes (%s): %v", last, err)
	}
}

// dumpState logs what helps diagnose a failure: pods, events, agent logs, component log tails.
func dumpState(t *testing.T, c *k8s.Cluster) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, args := range [][]string{
		{"get", "nodes,pods", "-A", "-o", "wide"},
		{"get", "events", "-A", "--sort-by=.lastTimestamp"},
		{"-n", "meshcrypt", "describe", "pods"},
		{"-n", "meshcrypt", "logs", "-l", "app.kubernetes.io/component=agent", "--all-containers", "--tail=40", "--prefix"},
		{"get", "meshnodes", "-o", "yaml"},
	} {
		out, _ := c.Kubectl(ctx, args...)
		t.Logf("kubectl %s:\n%s", strings.Join(args, " "), out)
	}
	logs, _ := filepath.Glob(filepath.Join(c.Logs(), "*.log"))
	for _, l := range logs {
		b, _ := os.ReadFile(l)
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		t.Logf("%s (last lines):\n%s", filepath.Base(l), strings.Join(lines[max(0, len(lines)-15):], "\n"))
	}
}

// agentImageRef returns the agent image the install manifest names.
func agentImageRef(t *testing.T, manifest string) string {
	t.Helper()
	b, err := os.ReadFile(manifest)
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^\s+image: "?([^"\s]+)"?\s*$`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("no image in %s", manifest)
	}
	return string(m[1])
}

func moduleRoot(t *testing.T) string {
	t.Helper()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for d := wd; d != "/"; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d
		}
	}
	t.Fatal("no go.mod above the working directory")
	return ""
}

// checkNothingLeft fails the test if anything of the cluster whose directory was dir is left on
// the machine.
func checkNothingLeft(t *testing.T, dir string) {
	t.Helper()
	if dir == "" {
		return
	}
	if left := k8s.Leftovers(dir); len(left) > 0 {
		t.Errorf("left behind by the cluster in %s:\n%s", dir, strings.Join(left, "\n"))
	}
}
