package main

import (
	"context"
	"fmt"
	"io"
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
	var from, to, port, clusterName string
	check := &cobra.Command{
		Use:   "check --from NS/POD --to NS/POD --port PORT/PROTO",
		Short: "explain whether traffic from one pod to another is allowed, and by which rule",
		Long: "Computes the verdict the classifier reaches for a packet from one pod to another, from\n" +
			"the cluster's MeshPolicies and identities, and names the rule that allowed it or the\n" +
			"policies that make the direction default-deny. Exits 0 when the traffic is allowed, 1 when it\n" +
			"is denied, 2 on an error (a pod that does not exist, no identity yet, no permission).",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			proto, p, err := parsePortProto(port)
			if err != nil {
				return err
			}
			for i, s := range []string{from, to} {
				if _, err := podRef(s); err != nil {
					return fmt.Errorf("%s %w", [2]string{"--from", "--to"}[i], err)
				}
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			allowed, err := policyCheck(cmd.Context(), c, cmd.OutOrStdout(), from, to, proto, p, clusterName)
			if err != nil {
				return err
			}
			if !allowed {
				return errVerdict
			}
			return nil
		},
	}
	check.Flags().StringVar(&from, "from", "", "source pod, NAMESPACE/NAME (namespace default if omitted)")
	check.Flags().StringVar(&to, "to", "", "destination pod, NAMESPACE/NAME")
	check.Flags().StringVar(&port, "port", "", "destination port and protocol: 5432/TCP, 53/UDP, ICMP")
	check.Flags().StringVar(&clusterName, "cluster-name", "default", "the cluster's name, as the agents are configured")
	for _, f := range []string{"from", "to", "port"} {
		_ = check.MarkFlagRequired(f)
	}
	_ = check.RegisterFlagCompletionFunc("from", completePods(g))
	_ = check.RegisterFlagCompletionFunc("to", completePods(g))
	_ = check.RegisterFlagCompletionFunc("port", cobra.NoFileCompletions)
	cmd.AddCommand(check)
	return cmd
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

// policyCheck prints the decision for a packet from one pod to another and reports whether it
// is allowed.
func policyCheck(ctx context.Context, c client.Client, out io.Writer, from, to string, proto uint8, port uint16, clusterName string) (bool, error) {
	ids, err := listIdentities(ctx, c)
	if err != nil {
		return false, err
	}
	type end struct {
		ref string
		pod corev1.Pod
		id  uint32
	}
	var ends [2]end
	flagOf := [2]string{"--from", "--to"}
	for i, s := range []string{from, to} {
		e := &ends[i]
		key, err := podRef(s)
		if err != nil {
			return false, fmt.Errorf("%s %w", flagOf[i], err)
		}
		e.ref = key.String()
		if err := c.Get(ctx, key, &e.pod); err != nil {
			if apierrors.IsNotFound(err) {
				return false, fmt.Errorf("%s %s: pod not found (want NAMESPACE/NAME; a name alone means namespace default)", flagOf[i], e.ref)
			}
			return false, fmt.Errorf("get pod %s: %w", e.ref, err)
		}
		l, err := identity.Canonical(e.pod.Labels, e.pod.Namespace, e.pod.Spec.ServiceAccountName, clusterName)
		if err != nil {
			return false, fmt.Errorf("pod %s has no valid identity: %w", e.ref, err)
		}
		for _, id := range ids {
			if identity.FromMap(id.Labels).Equal(l) {
				e.id = id.ID
			}
		}
		if e.id == 0 {
			return false, fmt.Errorf("pod %s (labels %s) has no identity yet: is an agent running?", e.ref, l)
		}
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
	res := policy.Compile(policy.Input{Policies: pols.Items, Identities: ids, NamespaceLabels: nsLabels})
	d := res.Decide(ends[0].id, ends[1].id, proto, port)
	what := fmt.Sprintf("%d/%s", port, protoName(proto))
	if proto == policy.ProtoICMP {
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
	return d.Allowed(), nil
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
