package main

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/identity"
	identitykube "github.com/meshcrypt/meshcrypt/pkg/identity/kube"
	"github.com/meshcrypt/meshcrypt/pkg/policy"
)

func newIdentitiesCmd(g *globals) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "identities",
		Short: "list the numeric identities and their label sets",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			ids, err := listIdentities(cmd.Context(), c)
			if err != nil {
				return err
			}
			type row struct {
				Identity uint32            `json:"identity"`
				Cluster  uint8             `json:"cluster"`
				Labels   map[string]string `json:"labels"`
			}
			rows := []row{}
			for _, id := range ids {
				rows = append(rows, row{id.ID, identity.Identity(id.ID).Cluster(), id.Labels})
			}
			return writeOutput(cmd.OutOrStdout(), output, rows, func(w io.Writer) error {
				tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
				fmt.Fprintln(tw, "IDENTITY\tCLUSTER\tLABELS")
				for _, id := range ids {
					fmt.Fprintf(tw, "%d\t%d\t%s\n", id.ID, identity.Identity(id.ID).Cluster(), identity.FromMap(id.Labels).String())
				}
				return tw.Flush()
			})
		},
	}
	addOutputFlag(cmd, &output)
	return cmd
}

// listIdentities reads every MeshIdentity, sorted by number.
func listIdentities(ctx context.Context, c client.Client) ([]policy.Identity, error) {
	var list v1alpha1.MeshIdentityList
	if err := c.List(ctx, &list); err != nil {
		return nil, fmt.Errorf("list MeshIdentities: %w", err)
	}
	var out []policy.Identity
	for i := range list.Items {
		id, l, err := identitykube.FromObject(&list.Items[i])
		if err != nil {
			continue
		}
		out = append(out, policy.Identity{ID: uint32(id), Labels: l.Map()})
	}
	slices.SortFunc(out, func(a, b policy.Identity) int { return int(a.ID) - int(b.ID) })
	return out, nil
}

func newPolicyCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "policy", Short: "inspect MeshPolicy decisions"}
	var ends [2]endFlags
	var port, clusterName string
	check := &cobra.Command{
		Use:   "check (--from NS/POD | --from-ip IP | --from-entity ENTITY) (--to NS/POD | --to-ip IP | --to-entity ENTITY) --port PORT/PROTO",
		Short: "explain whether traffic between pods, addresses and entities is allowed, and by which rule",
		Long: "Computes the verdict the classifier reaches for a packet from one end to the other, from\n" +
			"the cluster's MeshPolicies, identities and MeshConfig, and names the rule that allowed it or\n" +
			"the policies that make the direction default-deny. An end is a pod (NAMESPACE/NAME), an\n" +
			"address (--from-ip/--to-ip: a pod's or a node's address resolves to it; any other address\n" +
			"to the CIDR identity of the most specific ipBlock that holds it, else world), or an entity\n" +
			"(host: the node of the pod at the other end; remote-node; world). Exits 0 when the traffic\n" +
			"is allowed, 1 when it is denied, 2 on an error (a pod that does not exist, no identity yet,\n" +
			"no permission).",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			proto, p, err := parsePortProto(port)
			if err != nil {
				return err
			}
			for i := range ends {
				if err := ends[i].check(); err != nil {
					return err
				}
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			allowed, err := policyCheck(cmd.Context(), c, cmd.OutOrStdout(), checkRequest{ends: ends, proto: proto, port: p, clusterName: clusterName})
			if err != nil {
				return err
			}
			if !allowed {
				return errVerdict
			}
			return nil
		},
	}
	for i, side := range []string{"from", "to"} {
		e := &ends[i]
		e.side = side
		what := [2]string{"source", "destination"}[i]
		check.Flags().StringVar(&e.pod, side, "", what+" pod, NAMESPACE/NAME (namespace default if omitted)")
		check.Flags().StringVar(&e.ip, side+"-ip", "", what+" address (IPv4 or IPv6): a pod, a node, or an address outside the cluster")
		check.Flags().StringVar(&e.entity, side+"-entity", "", what+" entity: host, remote-node or world")
		check.MarkFlagsOneRequired(side, side+"-ip", side+"-entity")
		check.MarkFlagsMutuallyExclusive(side, side+"-ip", side+"-entity")
		_ = check.RegisterFlagCompletionFunc(side, completePods(g))
		_ = check.RegisterFlagCompletionFunc(side+"-ip", cobra.NoFileCompletions)
		_ = check.RegisterFlagCompletionFunc(side+"-entity", cobra.FixedCompletions(
			[]string{string(v1alpha1.EntityHost), string(v1alpha1.EntityRemoteNode), string(v1alpha1.EntityWorld)}, cobra.ShellCompDirectiveNoFileComp))
	}
	check.Flags().StringVar(&port, "port", "", "destination port and protocol: 5432/TCP, 53/UDP, ICMP")
	check.Flags().StringVar(&clusterName, "cluster-name", "default", "the cluster's name, as the agents are configured")
	_ = check.MarkFlagRequired("port")
	_ = check.RegisterFlagCompletionFunc("port", cobra.NoFileCompletions)
	cmd.AddCommand(check)
	return cmd
}

// endFlags is one end of a policy check as given on the command line: exactly one of a pod,
// an address, an entity.
type endFlags struct {
	side            string // "from" or "to"
	pod, ip, entity string
}

// check validates the end's syntax before anything is read from the cluster.
func (e endFlags) check() error {
	switch {
	case e.pod != "":
		if _, err := podRef(e.pod); err != nil {
			return fmt.Errorf("--%s %w", e.side, err)
		}
	case e.ip != "":
		if _, err := netip.ParseAddr(e.ip); err != nil {
			return fmt.Errorf("--%s-ip %q: not an IPv4 or IPv6 address", e.side, e.ip)
		}
	default:
		if _, ok := entityIdentity(v1alpha1.Entity(e.entity)); !ok {
			return fmt.Errorf("--%s-entity %q: want host, remote-node or world", e.side, e.entity)
		}
	}
	return nil
}

// entityIdentity is the reserved identity an entity stands for as one end of a check.
func entityIdentity(e v1alpha1.Entity) (uint32, bool) {
	switch e {
	case v1alpha1.EntityHost:
		return uint32(identity.Host), true
	case v1alpha1.EntityRemoteNode:
		return uint32(identity.RemoteNode), true
	case v1alpha1.EntityWorld:
		return uint32(identity.World), true
	}
	return 0, false
}

func parsePortProto(s string) (uint8, uint16, error) {
	if strings.EqualFold(s, "icmp") {
		return policy.ProtoICMP, 0, nil
	}
	num, proto, ok := strings.Cut(s, "/")
	if !ok {
		return 0, 0, fmt.Errorf("--port %q: want PORT/TCP, PORT/UDP or ICMP", s)
	}
	n, err := strconv.ParseUint(num, 10, 16)
	if err != nil || n == 0 {
		return 0, 0, fmt.Errorf("--port %q: port must be 1-65535", s)
	}
	switch strings.ToUpper(proto) {
	case "TCP":
		return policy.ProtoTCP, uint16(n), nil
	case "UDP":
		return policy.ProtoUDP, uint16(n), nil
	}
	return 0, 0, fmt.Errorf("--port %q: protocol must be TCP or UDP (or use ICMP alone)", s)
}

// podRef parses a pod given as NAMESPACE/NAME, or NAME in namespace default.
func podRef(s string) (client.ObjectKey, error) {
	key := client.ObjectKey{Namespace: "default", Name: s}
	if ns, name, ok := strings.Cut(s, "/"); ok {
		key = client.ObjectKey{Namespace: ns, Name: name}
	}
	if key.Namespace == "" || key.Name == "" || strings.Contains(key.Name, "/") {
		return key, fmt.Errorf("%q: want a pod as NAMESPACE/NAME (or NAME in namespace default)", s)
	}
	return key, nil
}

// checkRequest is what policy check explains.
type checkRequest struct {
	ends        [2]endFlags
	proto       uint8
	port        uint16
	clusterName string
}

// checkEnd is one resolved end of a check.
type checkEnd struct {
	ref  string      // how it is printed
	pod  *corev1.Pod // the pod, if the end is one
	id   uint32
	addr netip.Addr // the address, if given as one
	node string     // a node's address: the node's name
}

// policyCheck prints the decision for a packet from one end to the other and reports whether
// it is allowed.
func policyCheck(ctx context.Context, c client.Client, out io.Writer, req checkRequest) (bool, error) {
	ids, err := listIdentities(ctx, c)
	if err != nil {
		return false, err
	}
	var pols v1alpha1.MeshPolicyList
	if err := c.List(ctx, &pols); err != nil {
		return false, fmt.Errorf("list MeshPolicies: %w", err)
	}
	var nss corev1.NamespaceList
	if err := c.List(ctx, &nss); err != nil {
		return false, fmt.Errorf("list namespaces: %w", err)
	}
	nsLabels := map[string]map[string]string{}
	for _, ns := range nss.Items {
		nsLabels[ns.Name] = ns.Labels
	}
	var mc v1alpha1.MeshConfig
	if err := c.Get(ctx, client.ObjectKey{Name: v1alpha1.MeshConfigName}, &mc); err != nil && !apierrors.IsNotFound(err) {
		return false, fmt.Errorf("get MeshConfig: %w", err)
	}
	clusterID := uint8(1)
	if mc.Spec.Cluster != nil {
		clusterID = uint8(mc.Spec.Cluster.ID)
	}
	res := policy.Compile(policy.Input{
		Policies: pols.Items, Identities: ids, NamespaceLabels: nsLabels,
		ClusterID: clusterID, AllowHostToLocalPods: mc.Spec.Policy.HostToLocalPodsAllowed(),
	})
	var ends [2]checkEnd
	for i, f := range req.ends {
		if ends[i], err = resolveEnd(ctx, c, f, ids, res.CIDRs, req.clusterName); err != nil {
			return false, err
		}
	}
	// host is the node of the pod at the other end: an address of another node is remote-node
	// seen from there.
	for i := range ends {
		if ends[i].node == "" {
			continue
		}
		kind := "remote-node"
		if other := ends[1-i]; other.pod != nil && other.pod.Spec.NodeName == ends[i].node {
			ends[i].id, kind = uint32(identity.Host), "host"
		}
		ends[i].ref = fmt.Sprintf("%s (node %s, %s)", ends[i].addr, ends[i].node, kind)
	}
	d := res.Decide(ends[0].id, ends[1].id, req.proto, req.port)
	what := fmt.Sprintf("%d/%s", req.port, protoName(req.proto))
	if req.proto == policy.ProtoICMP {
		what = "ICMP"
	}
	verdict := "ALLOWED"
	if !d.Allowed() {
		verdict = "DENIED"
	}
	fmt.Fprintf(out, "%s: %s (identity %d) -> %s (identity %d) %s\n", verdict, ends[0].ref, ends[0].id, ends[1].ref, ends[1].id, what)
	byID := map[uint32]map[string]string{}
	for _, id := range ids {
		byID[id.ID] = id.Labels
	}
	for _, side := range []struct {
		name string
		ref  string
		id   uint32
		v    policy.Verdict
		dir  v1alpha1.PolicyType
	}{
		{"egress", ends[0].ref, ends[0].id, d.Egress, v1alpha1.PolicyTypeEgress},
		{"ingress", ends[1].ref, ends[1].id, d.Ingress, v1alpha1.PolicyTypeIngress},
	} {
		switch {
		case !side.v.Enforced:
			fmt.Fprintf(out, "  %s of %s: allowed, no policy selects it for %s\n", side.name, side.ref, side.name)
		case side.v.Allowed:
			fmt.Fprintf(out, "  %s of %s: allowed by %s\n", side.name, side.ref, res.Rules[side.v.Rule-1])
		default:
			fmt.Fprintf(out, "  %s of %s: DENIED: default-deny (selected by %s) and no rule allows it\n",
				side.name, side.ref, strings.Join(selectingPolicies(pols.Items, byID[side.id], side.dir), ", "))
		}
		if side.v.Encrypt {
			fmt.Fprintf(out, "  %s of %s: encryption required: dropped whenever the tunnel to the other node is not ready\n", side.name, side.ref)
		}
	}
	// Policy allows connections (docs/datapath.md, "Connections"): say what follows for the
	// rest of this one, so that nobody adds a rule for the replies.
	if d.Allowed() {
		fmt.Fprintf(out, "  connection: its replies (and ICMP errors about it) pass without a rule; a policy change that no longer allows it stops it at its next packet\n")
	} else {
		fmt.Fprintf(out, "  connection: never opened, so nothing answers it; a reply to a connection opened the other way is not judged by these rules\n")
	}
	return d.Allowed(), nil
}

// resolveEnd finds the identity of one end: a pod's from its labels; an address's as the
// ipcache would (a pod's address is the pod; a node's underlay address is that node, host or
// remote-node depending on the other end; else the most specific ipBlock's CIDR identity, or
// world); an entity's reserved identity.
func resolveEnd(ctx context.Context, c client.Client, f endFlags, ids []policy.Identity, cidrs map[netip.Prefix]uint32, clusterName string) (checkEnd, error) {
	switch {
	case f.entity != "":
		id, _ := entityIdentity(v1alpha1.Entity(f.entity))
		return checkEnd{ref: "entity " + f.entity, id: id}, nil
	case f.ip != "":
		addr, err := netip.ParseAddr(f.ip)
		if err != nil {
			return checkEnd{}, fmt.Errorf("--%s-ip %q: not an IPv4 or IPv6 address", f.side, f.ip)
		}
		addr = addr.Unmap()
		var pods corev1.PodList
		if err := c.List(ctx, &pods); err != nil {
			return checkEnd{}, fmt.Errorf("list pods: %w", err)
		}
		for i := range pods.Items {
			pod := &pods.Items[i]
			if pod.Spec.HostNetwork || pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
				continue
			}
			for _, pip := range pod.Status.PodIPs {
				if a, err := netip.ParseAddr(pip.IP); err == nil && a.Unmap() == addr {
					e, err := podEnd(ctx, c, "--"+f.side+"-ip", pod.Namespace+"/"+pod.Name, ids, clusterName)
					e.ref = fmt.Sprintf("%s (pod %s)", addr, e.ref)
					return e, err
				}
			}
		}
		var nodes v1alpha1.MeshNodeList
		if err := c.List(ctx, &nodes); err != nil {
			return checkEnd{}, fmt.Errorf("list MeshNodes: %w", err)
		}
		for _, n := range nodes.Items {
			for _, u := range n.Spec.UnderlayIPs {
				if a, err := netip.ParseAddr(string(u)); err == nil && a.Unmap() == addr {
					return checkEnd{id: uint32(identity.RemoteNode), addr: addr, node: n.Name}, nil
				}
			}
		}
		id := policy.Lookup(cidrs, addr)
		ref := fmt.Sprintf("%s (world)", addr)
		for p, pid := range cidrs {
			if pid == id {
				ref = fmt.Sprintf("%s (ipBlock %s)", addr, p)
			}
		}
		return checkEnd{ref: ref, id: id, addr: addr}, nil
	}
	return podEnd(ctx, c, "--"+f.side, f.pod, ids, clusterName)
}

// podEnd resolves a pod given as NAMESPACE/NAME to its identity.
func podEnd(ctx context.Context, c client.Client, flag, s string, ids []policy.Identity, clusterName string) (checkEnd, error) {
	key, err := podRef(s)
	if err != nil {
		return checkEnd{}, fmt.Errorf("%s %w", flag, err)
	}
	e := checkEnd{ref: key.String(), pod: &corev1.Pod{}}
	if err := c.Get(ctx, key, e.pod); err != nil {
		if apierrors.IsNotFound(err) {
			return e, fmt.Errorf("%s %s: pod not found (want NAMESPACE/NAME; a name alone means namespace default)", flag, e.ref)
		}
		return e, fmt.Errorf("get pod %s: %w", e.ref, err)
	}
	l, err := identity.Canonical(e.pod.Labels, e.pod.Namespace, e.pod.Spec.ServiceAccountName, clusterName)
	if err != nil {
		return e, fmt.Errorf("pod %s has no valid identity: %w", e.ref, err)
	}
	for _, id := range ids {
		if identity.FromMap(id.Labels).Equal(l) {
			e.id = id.ID
		}
	}
	if e.id == 0 {
		return e, fmt.Errorf("pod %s (labels %s) has no identity yet: is an agent running?", e.ref, l)
	}
	return e, nil
}

// selectingPolicies names the policies that make an identity default-deny in a direction.
func selectingPolicies(pols []v1alpha1.MeshPolicy, idLabels map[string]string, dir v1alpha1.PolicyType) []string {
	var out []string
	for _, p := range pols {
		if idLabels[policy.LabelNamespace] != p.Namespace {
			continue
		}
		sel, err := metav1.LabelSelectorAsSelector(&p.Spec.EndpointSelector)
		if err != nil || !sel.Matches(labels.Set(idLabels)) {
			continue
		}
		types := p.Spec.PolicyTypes
		if len(types) == 0 {
			types = []v1alpha1.PolicyType{v1alpha1.PolicyTypeIngress}
			if len(p.Spec.Egress) > 0 {
				types = append(types, v1alpha1.PolicyTypeEgress)
			}
		}
		if slices.Contains(types, dir) {
			out = append(out, p.Namespace+"/"+p.Name)
		}
	}
	return out
}

func protoName(p uint8) string {
	switch p {
	case policy.ProtoTCP:
		return "TCP"
	case policy.ProtoUDP:
		return "UDP"
	}
	return strconv.Itoa(int(p))
}
