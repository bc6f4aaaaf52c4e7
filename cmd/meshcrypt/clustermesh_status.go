package main

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
)

// meshReport is what `clustermesh status` prints: the local cluster's view of each remote
// cluster, from its MeshConfig, the remotes' Secrets and the local MeshNodes' status.
type meshReport struct {
	// Cluster is the local cluster's name ("default" when MeshConfig names none).
	Cluster string `json:"cluster"`
	// ClusterID is the local cluster's ID (1 when MeshConfig names none).
	ClusterID int32 `json:"clusterID"`
	// Connected is true when there is at least one remote cluster and a local node, and
	// every remote cluster's Secret is in place and every local node reports it Connected.
	Connected bool `json:"connected"`
	// Verdict is a one-line summary; it starts with "connected:" exactly when Connected.
	Verdict string `json:"verdict"`
	// LocalNodes are the names of the local MeshNodes, sorted.
	LocalNodes []string `json:"localNodes"`
	// Remotes is one entry per remote cluster, in MeshConfig's order.
	Remotes []remoteReport `json:"remotes"`
}

// remoteReport is the local cluster's view of one remote cluster.
type remoteReport struct {
	// Name, ID and SecretName are the remote's entry in MeshConfig spec.remoteClusters.
	Name       string `json:"name"`
	ID         int32  `json:"id"`
	SecretName string `json:"secretName"`
	// Secret is "ok", or what is wrong with the Secret (missing, no kubeconfig key, ...).
	Secret string `json:"secret"`
	// TokenExpires is when the Secret's token expires, as connect recorded it.
	TokenExpires *time.Time `json:"tokenExpires,omitempty"`
	// Connected, Unreachable and Refused count the local nodes reporting each state;
	// NotReported those whose MeshNode does not mention the remote.
	Connected   int `json:"connected"`
	Unreachable int `json:"unreachable"`
	Refused     int `json:"refused"`
	NotReported int `json:"notReported"`
	// Nodes, NodesRefused, Identities and PeersReady are the remote nodes imported and
	// refused, remote identities imported and remote peers ready, lowest and highest over
	// the local nodes that report the remote.
	Nodes        span `json:"nodes"`
	NodesRefused span `json:"nodesRefused"`
	Identities   span `json:"identities"`
	PeersReady   span `json:"peersReady"`
	// Problems are the local nodes that do not report the remote Connected, by name.
	Problems []nodeProblem `json:"problems,omitempty"`
	// OK is true when the Secret is in place and every local node reports Connected.
	OK bool `json:"ok"`
}

// span is the lowest and highest of a count over the local nodes; Reported is false when
// no node reports it.
type span struct {
	Min      int32 `json:"min"`
	Max      int32 `json:"max"`
	Reported bool  `json:"reported"`
}

// add counts one node's value.
func (s *span) add(v int32) {
	if !s.Reported {
		*s = span{Min: v, Max: v, Reported: true}
		return
	}
	s.Min, s.Max = min(s.Min, v), max(s.Max, v)
}

// String is "-" when no node reports, "3" when every node agrees, else "2-3".
func (s span) String() string {
	switch {
	case !s.Reported:
		return "-"
	case s.Min == s.Max:
		return strconv.Itoa(int(s.Min))
	}
	return fmt.Sprintf("%d-%d", s.Min, s.Max)
}

// nodeProblem is a local node that does not report a remote cluster Connected.
type nodeProblem struct {
	// Node is the local node's name.
	Node string `json:"node"`
	// State is Unreachable, Refused, or "" when the node does not report the remote.
	State v1alpha1.RemoteClusterState `json:"state,omitempty"`
	// Message is the agent's reason.
	Message string `json:"message,omitempty"`
	// LastSync is when the node last heard from the remote API server.
	LastSync *time.Time `json:"lastSync,omitempty"`
}

// secretInfo is what the CLI found of a remote's Secret: Problem is "" when it holds a
// kubeconfig, else what is wrong.
type secretInfo struct {
	Problem string
	Expires *time.Time
}

// summarizeMesh evaluates the local cluster's view of its remote clusters. cfg may be nil
// (no MeshConfig); secrets maps a Secret's name to what was found of it.
func summarizeMesh(cfg *v1alpha1.MeshConfig, nodes []v1alpha1.MeshNode, secrets map[string]secretInfo) meshReport {
	r := meshReport{Cluster: "default", ClusterID: 1, LocalNodes: []string{}, Remotes: []remoteReport{}}
	var remotes []v1alpha1.RemoteCluster
	if cfg != nil {
		if cfg.Spec.Cluster != nil {
			r.Cluster, r.ClusterID = cfg.Spec.Cluster.Name, cfg.Spec.Cluster.ID
		}
		remotes = cfg.Spec.RemoteClusters
	}
	nodes = slices.Clone(nodes)
	slices.SortFunc(nodes, func(a, b v1alpha1.MeshNode) int { return strings.Compare(a.Name, b.Name) })
	for _, n := range nodes {
		r.LocalNodes = append(r.LocalNodes, n.Name)
	}
	var bad []string
	for _, rc := range remotes {
		rr := remoteReport{Name: rc.Name, ID: rc.ID, SecretName: rc.SecretName, Secret: "ok"}
		si, found := secrets[rc.SecretName]
		switch {
		case !found:
			rr.Secret = fmt.Sprintf("Secret %s not read", rc.SecretName)
		case si.Problem != "":
			rr.Secret = si.Problem
		}
		rr.TokenExpires = si.Expires
		for _, n := range nodes {
			j := slices.IndexFunc(n.Status.RemoteClusters, func(s v1alpha1.RemoteClusterStatus) bool { return s.Name == rc.Name })
			if j < 0 {
				rr.NotReported++
				rr.Problems = append(rr.Problems, nodeProblem{Node: n.Name})
				continue
			}
			s := n.Status.RemoteClusters[j]
			switch s.State {
			case v1alpha1.RemoteConnected:
				rr.Connected++
			case v1alpha1.RemoteUnreachable:
				rr.Unreachable++
			default:
				rr.Refused++
			}
			if s.State != v1alpha1.RemoteConnected {
				p := nodeProblem{Node: n.Name, State: s.State, Message: s.Message}
				if s.LastSync != nil {
					t := s.LastSync.Time
					p.LastSync = &t
				}
				rr.Problems = append(rr.Problems, p)
			}
			rr.Nodes.add(s.Nodes)
			rr.NodesRefused.add(s.NodesRefused)
			rr.Identities.add(s.Identities)
			rr.PeersReady.add(s.PeersReady)
		}
		rr.OK = rr.Secret == "ok" && len(nodes) > 0 && rr.Connected == len(nodes)
		if !rr.OK {
			bad = append(bad, rr.Name+": "+rr.problem(len(nodes)))
		}
		r.Remotes = append(r.Remotes, rr)
	}
	switch {
	case len(remotes) == 0:
		r.Verdict = "NOT connected: no remote clusters (MeshConfig spec.remoteClusters is empty; add one with clustermesh connect)"
	case len(nodes) == 0:
		r.Verdict = "NOT connected: no local MeshNodes: no agent reports yet"
	case len(bad) > 0:
		r.Verdict = fmt.Sprintf("NOT connected: %s", strings.Join(bad, "; "))
	default:
		r.Connected = true
		r.Verdict = fmt.Sprintf("connected: %s reachable from every node (%s)", count(len(remotes), "remote cluster"), count(len(nodes), "node"))
	}
	return r
}

// problem says in a few words why a remote is not OK, with nodes local nodes.
func (rr remoteReport) problem(nodes int) string {
	var parts []string
	if rr.Secret != "ok" {
		parts = append(parts, rr.Secret)
	}
	if nodes > 0 && rr.Connected < nodes {
		parts = append(parts, fmt.Sprintf("reachable from %d/%d nodes", rr.Connected, nodes))
	}
	if len(parts) == 0 {
		return "no local node reports"
	}
	return strings.Join(parts, ", ")
}

// count is "1 node", "2 nodes".
func count(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return fmt.Sprintf("%d %ss", n, noun)
}

// WriteTable writes the verdict, one row per remote cluster and one line per problem.
func (r meshReport) WriteTable(w io.Writer, now time.Time) error {
	fmt.Fprintln(w, r.Verdict)
	fmt.Fprintf(w, "cluster: %s (ID %d), %s\n", r.Cluster, r.ClusterID, count(len(r.LocalNodes), "node"))
	if len(r.Remotes) == 0 {
		return nil
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "REMOTE\tID\tSECRET\tTOKEN EXPIRES\tREACHABLE FROM\tNODES\tREFUSED\tIDENTITIES\tPEERS READY")
	for _, rr := range r.Remotes {
		expires := "-"
		if rr.TokenExpires != nil {
			expires = "in " + humanDuration(rr.TokenExpires.Sub(now))
			if !rr.TokenExpires.After(now) {
				expires = "EXPIRED"
			}
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%d/%d nodes\t%s\t%s\t%s\t%s\n", rr.Name, rr.ID, rr.Secret, expires,
			rr.Connected, len(r.LocalNodes), rr.Nodes, rr.NodesRefused, rr.Identities, rr.PeersReady)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	var lines []string
	for _, rr := range r.Remotes {
		for _, p := range rr.Problems {
			if p.State == "" {
				lines = append(lines, fmt.Sprintf("%s: node %s does not report it (agent not running, or not yet updated)", rr.Name, p.Node))
				continue
			}
			l := fmt.Sprintf("%s: node %s %s", rr.Name, p.Node, p.State)
			if p.LastSync != nil {
				l += fmt.Sprintf(" (last sync %s ago)", humanDuration(now.Sub(*p.LastSync)))
			} else {
				l += " (never synced)"
			}
			if p.Message != "" {
				l += ": " + p.Message
			}
			lines = append(lines, l)
		}
	}
	if len(lines) > 0 {
		fmt.Fprintln(w)
		for _, l := range lines {
			fmt.Fprintln(w, l)
		}
	}
	return nil
}

// humanDuration rounds d to what a reader needs: seconds under a minute, minutes under an
// hour, hours under two days, else days.
func humanDuration(d time.Duration) string {
	switch {
	case d < 0:
		return "0s"
	case d < time.Minute:
		return d.Truncate(time.Second).String()
	case d < time.Hour:
		return d.Truncate(time.Minute).String()
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh", int(d/time.Hour))
	}
	return fmt.Sprintf("%dd", int(d/(24*time.Hour)))
}

// meshStatusOptions are the flags of `clustermesh status`.
type meshStatusOptions struct {
	// namespace is the agents' namespace, which holds the remotes' Secrets.
	namespace string
	// output is the format of -o.
	output string
}

// clustermeshStatus reads and prints the local cluster's view of its remote clusters.
func clustermeshStatus(ctx context.Context, g *globals, o meshStatusOptions, out io.Writer) error {
	if err := checkOutput(o.output); err != nil {
		return err
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	var cfg *v1alpha1.MeshConfig
	var mc v1alpha1.MeshConfig
	switch err := c.Get(ctx, client.ObjectKey{Name: v1alpha1.MeshConfigName}, &mc); {
	case err == nil:
		cfg = &mc
	case apierrors.IsNotFound(err):
	default:
		return fmt.Errorf("get MeshConfig %s: %w", v1alpha1.MeshConfigName, err)
	}
	var nodes v1alpha1.MeshNodeList
	if err := c.List(ctx, &nodes); err != nil {
		return fmt.Errorf("list MeshNodes: %w", err)
	}
	secrets := map[string]secretInfo{}
	if cfg != nil {
		for _, rc := range cfg.Spec.RemoteClusters {
			if _, done := secrets[rc.SecretName]; done {
				continue
			}
			if secrets[rc.SecretName], err = readRemoteSecret(ctx, c, o.namespace, rc.SecretName); err != nil {
				return err
			}
		}
	}
	r := summarizeMesh(cfg, nodes.Items, secrets)
	if err := writeOutput(out, o.output, r, func(w io.Writer) error { return r.WriteTable(w, time.Now()) }); err != nil {
		return err
	}
	if !r.Connected {
		return errVerdict
	}
	return nil
}

// readRemoteSecret checks that a remote's Secret holds a kubeconfig, and reads the token's
// expiry that connect recorded. It never returns the Secret's content.
func readRemoteSecret(ctx context.Context, c client.Client, namespace, name string) (secretInfo, error) {
	var sec corev1.Secret
	err := c.Get(ctx, client.ObjectKey{Namespace: namespace, Name: name}, &sec)
	if apierrors.IsNotFound(err) {
		return secretInfo{Problem: fmt.Sprintf("Secret %s/%s missing", namespace, name)}, nil
	}
	if err != nil {
		return secretInfo{}, fmt.Errorf("get Secret %s/%s: %w", namespace, name, err)
	}
	var si secretInfo
	if s, ok := sec.Annotations[annotationTokenExpires]; ok {
		if t, err := time.Parse(time.RFC3339, s); err == nil {
			si.Expires = &t
		}
	}
	kc, ok := sec.Data[v1alpha1.RemoteKubeconfigKey]
	if !ok {
		si.Problem = fmt.Sprintf("Secret %s/%s has no key %s", namespace, name, v1alpha1.RemoteKubeconfigKey)
		return si, nil
	}
	if _, err := clientcmd.Load(kc); err != nil {
		si.Problem = fmt.Sprintf("Secret %s/%s: key %s is not a kubeconfig", namespace, name, v1alpha1.RemoteKubeconfigKey)
	}
	return si, nil
}
