package e2e

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/tests/cluster"
	"github.com/meshcrypt/meshcrypt/tests/netenv"
)

// procStatus reads VmRSS (KiB) and Threads of a process.
func procStatus(t *testing.T, pid int) (rssKiB, threads int) {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, _ := strings.Cut(sc.Text(), ":")
		fields := strings.Fields(v)
		if len(fields) == 0 {
			continue
		}
		n, _ := strconv.Atoi(fields[0])
		switch k {
		case "VmRSS":
			rssKiB = n
		case "Threads":
			threads = n
		}
	}
	return rssKiB, threads
}

// agentsAlive fails the test if an agent process exited.
func agentsAlive(t *testing.T, c *cluster.Cluster) {
	t.Helper()
	for _, n := range c.Nodes() {
		done, errf := n.AgentExited()
		select {
		case <-done:
			t.Errorf("agent of %s exited: %v", n.Name, errf())
		default:
		}
	}
}

// TestFaults: the datapath survives what breaks around it, and nothing leaks in clear meanwhile.
func TestFaults(t *testing.T) {
	c := cluster.StartT(t, cluster.Options{Backend: string(wgBackend)})
	ctx := context.Background()
	pods := addNodesWithPods(ctx, t, c, 3)
	if out, err := c.Run(ctx, "meshcrypt", "encryption", "enable", "--mode", "wireguard", "--wait", "--timeout", "1m"); err != nil {
		t.Fatal(err, out)
	}
	m := newMarker(t)
	cp := capture(t, c, m) // across every fault below: the marker must never be on the wire
	t.Cleanup(func() {
		if got := cp.Count(m); got != 0 {
			t.Errorf("marker seen in clear %d times during the fault tests", got)
		}
	})
	for _, pr := range [][2]*netenv.Pod{{pods[0], pods[1]}, {pods[0], pods[2]}, {pods[1], pods[2]}} {
		if !reaches(pr[0], pr[1], 7200, m, 20*time.Second) {
			t.Fatalf("%s -> %s does not flow", pr[0].Name, pr[1].Name)
		}
	}

	t.Run("forged MeshNodes from a privileged writer are refused, never configured", func(t *testing.T) {
		forgedKey, _ := wgtypes.GeneratePrivateKey()
		n2CIDRs := c.Node("n2").PodCIDRs
		forged := []*v1alpha1.MeshNode{
			// Claims n2's pods, with no Kubernetes Node.
			{ObjectMeta: metav1.ObjectMeta{Name: "forged"}, Spec: v1alpha1.MeshNodeSpec{
				UnderlayIPs: []v1alpha1.IP{"10.77.0.99"},
				PodCIDRs:    []v1alpha1.CIDR{v1alpha1.CIDR(n2CIDRs[0].String())},
				WireGuard:   &v1alpha1.WireGuardSpec{PublicKey: forgedKey.PublicKey().String(), ListenPort: 51871},
			}},
		}
		for _, mn := range forged {
			if err := c.Client.Create(ctx, mn); err != nil {
				t.Fatal(err)
			}
		}
		err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
			mns, err := c.MeshNodes(ctx)
			if err != nil {
				return false, nil
			}
			for _, mn := range mns {
				if mn.Name == "forged" {
					continue
				}
				deg := false
				for _, cond := range mn.Status.Conditions {
					if cond.Type == v1alpha1.ConditionDegraded && cond.Status == metav1.ConditionTrue && strings.Contains(cond.Message, "forged") {
						deg = true
					}
				}
				if !deg {
					return false, nil
				}
			}
			return true, nil
		})
		if err != nil {
			t.Fatal("not every agent reports the forged MeshNode as refused (Degraded)")
		}
		var events corev1.EventList
		if err := c.Client.List(ctx, &events); err != nil {
			t.Fatal(err)
		}
		refusals := 0
		for _, e := range events.Items {
			if e.Reason == "PeerRefused" && e.InvolvedObject.Name == "forged" {
				refusals++
			}
		}
		if refusals == 0 {
			t.Error("no PeerRefused event on the forged MeshNode")
		}
		for _, n := range c.Nodes() {
			peers, _ := deviceState(t, n)
			for _, k := range peers {
				if k == forgedKey.PublicKey().String() {
					t.Errorf("%s configured the forged key", n.Name)
				}
			}
		}
		if !reaches(pods[0], pods[1], 7201, m, 10*time.Second) {
			t.Error("n1 -> n2 broken by the forged MeshNode")
		}
		agentsAlive(t, c)
		for _, mn := range forged {
			_ = c.Client.Delete(ctx, mn)
		}
	})

	t.Run("kill -9 of an agent under traffic loses nothing", func(t *testing.T) {
		s, err := cluster.StartStream(pods[0], pods[1], pods[1].IPv4, 7210, m, 5*time.Millisecond, 4000)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(500 * time.Millisecond)
		if err := c.Node("n1").KillAgent(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Second)
		start := time.Now()
		if err := c.Node("n1").StartAgent(); err != nil {
			t.Fatal(err)
		}
		if _, err := c.WaitConverged(ctx, v1alpha1.ModeWireGuard, time.Minute); err != nil {
			t.Fatal(err)
		}
		recovered := time.Since(start)
		sent, received, lost := s.Stop(300 * time.Millisecond)
		t.Logf("SIGKILL + 2 s down + restart: agent reconverged %s after start; stream sent %d, received %d, lost %d",
			recovered.Round(time.Millisecond), sent, received, len(lost))
		if len(lost) != 0 {
			t.Errorf("lost %d packets across kill -9", len(lost))
		}
	})

	t.Run("API server down for 60 s: traffic flows, agents catch up after", func(t *testing.T) {
		c.NeedOwnControlPlane(t, "stops and starts kube-apiserver")
		s, err := cluster.StartStream(pods[0], pods[2], pods[2].IPv4, 7220, m, 20*time.Millisecond, 5000)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.CP.StopAPIServer(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(60 * time.Second)
		agentsAlive(t, c)
		if err := c.CP.StartAPIServer(ctx); err != nil {
			t.Fatal(err)
		}
		sent, received, lost := s.Stop(300 * time.Millisecond)
		t.Logf("60 s API outage: stream sent %d, received %d, lost %d", sent, received, len(lost))
		if len(lost) != 0 {
			t.Errorf("lost %d packets during the API outage", len(lost))
		}
		// A change after the outage reaches every agent without a restart.
		start := time.Now()
		n4, err := c.AddNode(ctx, "n4")
		if err != nil {
			t.Fatal(err)
		}
		p4, err := c.AddPod(ctx, n4, "n4-p1")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.WaitConverged(ctx, v1alpha1.ModeWireGuard, time.Minute); err != nil {
			t.Fatal(err)
		}
		t.Logf("after the outage, a new node was configured everywhere in %s", time.Since(start).Round(time.Millisecond))
		if !reaches(pods[0], p4, 7221, m, 20*time.Second) {
			t.Error("n1 -> new node after the outage does not flow")
		}
	})

	t.Run("etcd restart: traffic flows, agents follow later changes", func(t *testing.T) {
		c.NeedOwnControlPlane(t, "restarts etcd")
		s, err := cluster.StartStream(pods[1], pods[2], pods[2].IPv4, 7230, m, 10*time.Millisecond, 3000)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.CP.RestartEtcd(ctx); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Second)
		sent, received, lost := s.Stop(300 * time.Millisecond)
		t.Logf("etcd restart: stream sent %d, received %d, lost %d", sent, received, len(lost))
		if len(lost) != 0 {
			t.Errorf("lost %d packets across the etcd restart", len(lost))
		}
		if err := c.RemoveNode(ctx, "n4"); err != nil {
			t.Fatal(err)
		}
		if _, err := c.WaitConverged(ctx, v1alpha1.ModeWireGuard, time.Minute); err != nil {
			t.Fatal(err)
		}
		agentsAlive(t, c)
	})

	t.Run("a rebooted node keeps its key, gets a new boot ID and traffic recovers", func(t *testing.T) {
		var before v1alpha1.MeshNode
		if err := c.Client.Get(ctx, client.ObjectKey{Name: "n3"}, &before); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		n3, err := c.RebootNode(ctx, "n3")
		if err != nil {
			t.Fatal(err)
		}
		p3, err := c.AddPod(ctx, n3, "n3-p2")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.WaitConverged(ctx, v1alpha1.ModeWireGuard, time.Minute); err != nil {
			t.Fatal(err)
		}
		var after v1alpha1.MeshNode
		err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
			err := c.Client.Get(ctx, client.ObjectKey{Name: "n3"}, &after)
			return err == nil && after.Spec.BootID != before.Spec.BootID && after.Spec.BootID != "", nil
		})
		if err != nil {
			t.Errorf("boot ID %q -> %q: want a new one", before.Spec.BootID, after.Spec.BootID)
		}
		if after.Spec.WireGuard.PublicKey != before.Spec.WireGuard.PublicKey {
			t.Error("the key changed across the reboot: the state dir is the node's disk")
		}
		if !reaches(pods[0], p3, 7240, m, 20*time.Second) || !reaches(p3, pods[1], 7241, m, 20*time.Second) {
			t.Fatal("traffic to and from the rebooted node does not flow")
		}
		t.Logf("rebooted node back in service (new pod reachable, encrypted) %s after the reboot began", time.Since(start).Round(time.Millisecond))
	})

	t.Run("200 rapid MeshNode changes: agents converge, no resource growth", func(t *testing.T) {
		type usage struct{ rss, threads int }
		before := map[string]usage{}
		for _, n := range c.Nodes() {
			r, th := procStatus(t, n.AgentPID())
			before[n.Name] = usage{r, th}
		}
		// A node with a Kubernetes Node and pod CIDRs of its own, whose key changes 200 times.
		node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "churn"}, Spec: corev1.NodeSpec{PodCIDRs: []string{"10.250.0.0/24"}}}
		if err := c.Client.Create(ctx, node); err != nil {
			t.Fatal(err)
		}
		mn := &v1alpha1.MeshNode{ObjectMeta: metav1.ObjectMeta{Name: "churn"}, Spec: v1alpha1.MeshNodeSpec{
			UnderlayIPs: []v1alpha1.IP{"10.77.0.200"}, PodCIDRs: []v1alpha1.CIDR{"10.250.0.0/24"},
			WireGuard: &v1alpha1.WireGuardSpec{ListenPort: 51871},
		}}
		start := time.Now()
		var last wgtypes.Key
		for i := range 200 {
			k, _ := wgtypes.GeneratePrivateKey()
			last = k.PublicKey()
			mn.Spec.WireGuard.PublicKey = last.String()
			var err error
			if i == 0 {
				err = c.Client.Create(ctx, mn)
			} else {
				err = c.Client.Update(ctx, mn)
			}
			if err != nil {
				t.Fatalf("change %d: %v", i, err)
			}
		}
		err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, time.Minute, true, func(context.Context) (bool, error) {
			for _, n := range c.Nodes() {
				peers, _ := deviceState(t, n)
				found := false
				for _, p := range peers {
					found = found || p == last.String()
				}
				if !found {
					return false, nil
				}
			}
			return true, nil
		})
		if err != nil {
			t.Fatal("agents did not converge to the churned node's final key")
		}
		t.Logf("200 key changes written in %s; every agent has the final key %s after the first write",
			time.Since(start).Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
		time.Sleep(3 * time.Second)
		for _, n := range c.Nodes() {
			r, th := procStatus(t, n.AgentPID())
			b := before[n.Name]
			t.Logf("agent %s: RSS %d -> %d KiB, threads %d -> %d", n.Name, b.rss, r, b.threads, th)
			peers, _ := deviceState(t, n)
			if len(peers) != 3 {
				t.Errorf("%s has %d peers, want 3 (two nodes and churn)", n.Name, len(peers))
			}
		}
		_ = c.Client.Delete(ctx, mn)
		_ = c.Client.Delete(ctx, node)
		agentsAlive(t, c)
	})
}
