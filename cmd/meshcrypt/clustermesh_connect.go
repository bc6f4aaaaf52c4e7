package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strings"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
)

// readerResources are the only resources a remote cluster's agents may read, with
// readerVerbs only: the ClusterRole connect creates.
var (
	readerResources = []string{"meshnodes", "meshidentities"}
	readerVerbs     = []string{"get", "list", "watch"}
)

// minTokenDuration is the shortest token the TokenRequest API issues.
const minTokenDuration = 10 * time.Minute

// clusterName is the pattern of a cluster name (a DNS label, as the CRD validates it).
var clusterName = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)

// meshSide is one of the two clusters of connect or disconnect, as the operator's kubeconfig
// reaches it.
type meshSide struct {
	// context names the kubeconfig context, for messages.
	context string
	cfg     *rest.Config
	c       client.Client
	cs      kubernetes.Interface
	// mc is the side's MeshConfig as read; exists is false when it has none.
	mc     v1alpha1.MeshConfig
	exists bool
	// cluster is the side's name and ID; setCluster says connect writes it (it had none).
	cluster    v1alpha1.ClusterSpec
	setCluster bool
}

// sideError is an error of one side, described (see describe) and prefixed with its
// context, so that the user knows which cluster failed. It does not unwrap: describe has
// already said all there is.
type sideError struct {
	context string
	err     error
}

func (e *sideError) Error() string { return fmt.Sprintf("context %q: %s", e.context, describe(e.err)) }

// fail prefixes err with the side's context.
func (s *meshSide) fail(err error) error { return &sideError{context: s.context, err: err} }

// loadSide loads g's client configuration and makes the clients, reading nothing yet.
func loadSide(g *globals, context string) (*meshSide, error) {
	cfg, err := g.restConfig()
	if err != nil {
		return nil, err
	}
	c, err := newClient(cfg)
	if err != nil {
		return nil, fmt.Errorf("context %q: %w", context, err)
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("context %q: connect to %s: %w", context, cfg.Host, err)
	}
	return &meshSide{context: context, cfg: cfg, c: c, cs: cs}, nil
}

// loadSides loads the local cluster (g) and the remote one (--to-kubeconfig, --to-context),
// and reads both MeshConfigs.
func loadSides(ctx context.Context, g *globals, o connectOptions) (local, remote *meshSide, err error) {
	if o.namespace == "" {
		return nil, nil, errors.New("--namespace must not be empty")
	}
	rg, err := remoteGlobals(g, o)
	if err != nil {
		return nil, nil, err
	}
	if local, err = loadSide(g, currentContext(g)); err != nil {
		return nil, nil, err
	}
	if remote, err = loadSide(rg, o.toContext); err != nil {
		return nil, nil, err
	}
	if strings.TrimSuffix(local.cfg.Host, "/") == strings.TrimSuffix(remote.cfg.Host, "/") {
		return nil, nil, fmt.Errorf("context %q and --to-context %q reach the same API server (%s): the cluster mesh joins two different clusters",
			local.context, remote.context, local.cfg.Host)
	}
	for _, s := range []*meshSide{local, remote} {
		switch err := s.c.Get(ctx, client.ObjectKey{Name: v1alpha1.MeshConfigName}, &s.mc); {
		case err == nil:
			s.exists = true
		case apierrors.IsNotFound(err):
		default:
			return nil, nil, s.fail(fmt.Errorf("get MeshConfig %s: %w", v1alpha1.MeshConfigName, err))
		}
	}
	return local, remote, nil
}

// remoteGlobals are the kubeconfig and context of the remote cluster: --to-kubeconfig
// (default: the local cluster's kubeconfig) and --to-context, which must exist.
func remoteGlobals(g *globals, o connectOptions) (*globals, error) {
	if o.toContext == "" {
		return nil, errors.New("--to-context: name the remote cluster's kubeconfig context")
	}
	r := &globals{kubeconfig: cmp.Or(o.toKubeconfig, g.kubeconfig), context: o.toContext}
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = r.kubeconfig
	raw, err := rules.Load()
	if err != nil {
		if o.toKubeconfig != "" {
			return nil, fmt.Errorf("--to-kubeconfig %s: %w", o.toKubeconfig, err)
		}
		return nil, fmt.Errorf("load kubeconfig: %w", err)
	}
	if raw.Contexts[o.toContext] == nil {
		names := make([]string, 0, len(raw.Contexts))
		for n := range raw.Contexts {
			names = append(names, n)
		}
		slices.Sort(names)
		where := "the kubeconfig"
		if o.toKubeconfig != "" {
			where = o.toKubeconfig
		}
		if len(names) == 0 {
			return nil, fmt.Errorf("--to-context %q: no such context (%s has none; name the remote's kubeconfig with --to-kubeconfig)", o.toContext, where)
		}
		return nil, fmt.Errorf("--to-context %q: no such context (%s has: %s)", o.toContext, where, strings.Join(names, ", "))
	}
	return r, nil
}

// currentContext is the name of the context g selects, for messages.
func currentContext(g *globals) string {
	if g.context != "" {
		return g.context
	}
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = g.kubeconfig
	if raw, err := rules.Load(); err == nil && raw.CurrentContext != "" {
		return raw.CurrentContext
	}
	return "in-cluster"
}

// clusterFlags are the flags that name one side's cluster when it has no name yet.
type clusterFlags struct {
	name, id       string // the flags' names
	nameVal        string
	idVal          int32
	nameSet, idSet bool
}

// resolveCluster decides a side's cluster name and ID from its MeshConfig's spec.cluster
// and the flags: the flags set it when there is none (set is true), must agree with it when
// there is one, and are needed when there is none.
func resolveCluster(current *v1alpha1.ClusterSpec, f clusterFlags, context string) (spec v1alpha1.ClusterSpec, set bool, err error) {
	if f.nameSet != f.idSet {
		return spec, false, fmt.Errorf("--%s and --%s go together: a cluster needs both a name and an ID", f.name, f.id)
	}
	if f.nameSet {
		if len(f.nameVal) > 63 || !clusterName.MatchString(f.nameVal) {
			return spec, false, fmt.Errorf("--%s %q: a cluster name is a DNS label: at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit", f.name, f.nameVal)
		}
		if f.idVal < 1 || f.idVal > 255 {
			return spec, false, fmt.Errorf("--%s %d: a cluster ID is 1-255", f.id, f.idVal)
		}
	}
	switch {
	case current == nil && !f.nameSet:
		return spec, false, fmt.Errorf("context %q has no cluster name and ID (MeshConfig %s spec.cluster): give it one with --%s NAME --%s ID (1-255, unique in the mesh)",
			context, v1alpha1.MeshConfigName, f.name, f.id)
	case current == nil:
		return v1alpha1.ClusterSpec{Name: f.nameVal, ID: f.idVal}, true, nil
	case !f.nameSet || (current.Name == f.nameVal && current.ID == f.idVal):
		return *current, false, nil
	}
	return spec, false, fmt.Errorf("context %q is already cluster %q with ID %d (MeshConfig %s spec.cluster), not %q with ID %d: connect never renames a cluster, "+
		"as identities carry its ID; drop --%s/--%s, or edit spec.cluster and restart the agents if you mean to",
		context, current.Name, current.ID, v1alpha1.MeshConfigName, f.nameVal, f.idVal, f.name, f.id)
}

// checkPair refuses two clusters with the same name or ID, and a remote entry of either
// side that already holds the other's ID under another name.
func checkPair(a, b *meshSide) error {
	if a.cluster.Name == b.cluster.Name {
		return fmt.Errorf("both clusters are named %q (contexts %q and %q): every cluster of a mesh needs its own name", a.cluster.Name, a.context, b.context)
	}
	if a.cluster.ID == b.cluster.ID {
		return fmt.Errorf("both clusters have ID %d (%q in context %q, %q in context %q): every cluster of a mesh needs its own ID",
			a.cluster.ID, a.cluster.Name, a.context, b.cluster.Name, b.context)
	}
	for _, p := range [][2]*meshSide{{a, b}, {b, a}} {
		for _, r := range p[0].mc.Spec.RemoteClusters {
			if r.ID == p[1].cluster.ID && r.Name != p[1].cluster.Name {
				return fmt.Errorf("cluster %q (context %q) already has remote cluster %q with ID %d, the ID of %q: every cluster of a mesh needs its own ID",
					p[0].cluster.Name, p[0].context, r.Name, r.ID, p[1].cluster.Name)
			}
		}
	}
	return nil
}

// apiServer is the URL and TLS trust with which the other cluster's agents reach a side's
// API server.
type apiServer struct {
	url, serverName string
	ca              []byte
}

// apiServerOf is how the other cluster's nodes reach s: override (the value of --flag) or
// the server of the operator's kubeconfig, with its CA and TLS server name.
func apiServerOf(s *meshSide, override, flag string) (apiServer, error) {
	a := apiServer{url: s.cfg.Host, serverName: s.cfg.ServerName}
	if override != "" {
		if err := checkServerURL(flag, override); err != nil {
			return a, err
		}
		a.url = override
	}
	if s.cfg.Insecure {
		return a, fmt.Errorf("context %q skips TLS verification (insecure-skip-tls-verify): the other cluster's agents need the CA of its API server; set certificate-authority in the kubeconfig", s.context)
	}
	a.ca = s.cfg.CAData
	if len(a.ca) == 0 && s.cfg.CAFile != "" {
		b, err := os.ReadFile(s.cfg.CAFile)
		if err != nil {
			return a, fmt.Errorf("context %q: read certificate-authority: %w", s.context, err)
		}
		a.ca = b
	}
	return a, nil
}

// checkServerURL refuses a value of --remote-api-server or --local-api-server that is not
// an https URL: the token must not travel in clear.
func checkServerURL(flag, value string) error {
	if value == "" {
		return nil
	}
	u, err := url.Parse(value)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return fmt.Errorf("--%s %q: want an https URL such as https://10.0.0.10:6443", flag, value)
	}
	return nil
}

// readerKubeconfig is the kubeconfig a reader's agents use to read the cluster named
// cluster at server, with the reader's token. Its one context is named after the cluster.
func readerKubeconfig(cluster string, server apiServer, token string) ([]byte, error) {
	const user = "meshcrypt-clustermesh-reader"
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters[cluster] = &clientcmdapi.Cluster{Server: server.url, CertificateAuthorityData: server.ca, TLSServerName: server.serverName}
	cfg.AuthInfos[user] = &clientcmdapi.AuthInfo{Token: token}
	cfg.Contexts[cluster] = &clientcmdapi.Context{Cluster: cluster, AuthInfo: user}
	cfg.CurrentContext = cluster
	b, err := clientcmd.Write(*cfg)
	if err != nil {
		return nil, fmt.Errorf("encode kubeconfig: %w", err)
	}
	return b, nil
}

// peerLabels are the labels of every object connect creates for the peer cluster peer.
func peerLabels(peer string) map[string]string {
	return map[string]string{labelManagedBy: managedBy, labelClustermeshPeer: peer}
}

// namespaceMissing turns the API server's "namespaces not found" into advice.
func namespaceMissing(err error, ns string) error {
	var status apierrors.APIStatus
	if errors.As(err, &status) && apierrors.IsNotFound(err) {
		if d := status.Status().Details; d != nil && d.Kind == "namespaces" {
			return fmt.Errorf("namespace %q does not exist: install meshcrypt first, or name the agents' namespace with --namespace", ns)
		}
	}
	return err
}

// linker applies connect's and disconnect's changes to the clusters, and says what it did.
type linker struct {
	out io.Writer
	// ns is the agents' namespace on both clusters.
	ns string
	// tokenDuration is how long the tokens connect requests stay valid.
	tokenDuration time.Duration
}

// grantReader lets the cluster named reader read s's MeshNodes and MeshIdentities: a
// ServiceAccount, ClusterRole and ClusterRoleBinding on s, and a new token for the
// ServiceAccount. It returns the token and when it expires.
func (l linker) grantReader(ctx context.Context, s *meshSide, reader string) (string, time.Time, error) {
	name := clustermeshReaderPrefix + reader
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: l.ns}}
	op, err := controllerutil.CreateOrUpdate(ctx, s.c, sa, func() error {
		sa.Labels = mergeLabels(sa.Labels, peerLabels(reader))
		return nil
	})
	if err != nil {
		return "", time.Time{}, s.fail(namespaceMissing(fmt.Errorf("apply ServiceAccount %s/%s: %w", l.ns, name, err), l.ns))
	}
	fmt.Fprintf(l.out, "%s: ServiceAccount %s/%s %s\n", s.cluster.Name, l.ns, name, op)
	role := &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: name}}
	op, err = controllerutil.CreateOrUpdate(ctx, s.c, role, func() error {
		role.Labels = mergeLabels(role.Labels, peerLabels(reader))
		role.Rules = []rbacv1.PolicyRule{{APIGroups: []string{v1alpha1.GroupVersion.Group}, Resources: readerResources, Verbs: readerVerbs}}
		return nil
	})
	if err != nil {
		return "", time.Time{}, s.fail(fmt.Errorf("apply ClusterRole %s: %w", name, err))
	}
	fmt.Fprintf(l.out, "%s: ClusterRole %s %s (%s %s.%s only)\n", s.cluster.Name, name, op,
		strings.Join(readerVerbs, ", "), strings.Join(readerResources, ", "), v1alpha1.GroupVersion.Group)
	binding := &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: name}}
	op, err = controllerutil.CreateOrUpdate(ctx, s.c, binding, func() error {
		binding.Labels = mergeLabels(binding.Labels, peerLabels(reader))
		binding.RoleRef = rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: name}
		binding.Subjects = []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Namespace: l.ns, Name: name}}
		return nil
	})
	if err != nil {
		return "", time.Time{}, s.fail(fmt.Errorf("apply ClusterRoleBinding %s: %w", name, err))
	}
	fmt.Fprintf(l.out, "%s: ClusterRoleBinding %s %s\n", s.cluster.Name, name, op)
	secs := int64(l.tokenDuration / time.Second)
	tr, err := s.cs.CoreV1().ServiceAccounts(l.ns).CreateToken(ctx, name, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &secs},
	}, metav1.CreateOptions{})
	if err != nil {
		return "", time.Time{}, s.fail(fmt.Errorf("request a token for ServiceAccount %s/%s: %w", l.ns, name, err))
	}
	expires := tr.Status.ExpirationTimestamp.Time
	fmt.Fprintf(l.out, "%s: token for %s issued, expires %s\n", s.cluster.Name, reader, expires.UTC().Format(time.RFC3339))
	if requested := time.Now().Add(l.tokenDuration); expires.Before(requested.Add(-time.Hour)) {
		fmt.Fprintf(l.out, "%s: note: the API server shortened the token (asked for %s); run connect again before it expires\n", s.cluster.Name, l.tokenDuration)
	}
	return tr.Status.Token, expires, nil
}

// mergeLabels returns have with want's labels set.
func mergeLabels(have, want map[string]string) map[string]string {
	if have == nil {
		have = map[string]string{}
	}
	for k, v := range want {
		have[k] = v
	}
	return have
}

// credential is what a reader's agents need to read a remote cluster.
type credential struct {
	// server is the remote API server's URL in kubeconfig.
	server     string
	kubeconfig []byte
	// expires is when the kubeconfig's token expires.
	expires time.Time
}

// writeSecret writes, on the reader r, the Secret with the kubeconfig that reads remote.
func (l linker) writeSecret(ctx context.Context, r *meshSide, remote string, cred credential) error {
	name := clustermeshSecretPrefix + remote
	sec := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: l.ns}}
	op, err := controllerutil.CreateOrUpdate(ctx, r.c, sec, func() error {
		sec.Labels = mergeLabels(sec.Labels, peerLabels(remote))
		if sec.Annotations == nil {
			sec.Annotations = map[string]string{}
		}
		sec.Annotations[annotationTokenExpires] = cred.expires.UTC().Format(time.RFC3339)
		if sec.Type == "" {
			sec.Type = corev1.SecretTypeOpaque
		}
		sec.Data = map[string][]byte{v1alpha1.RemoteKubeconfigKey: cred.kubeconfig}
		return nil
	})
	if err != nil {
		return r.fail(namespaceMissing(fmt.Errorf("apply Secret %s/%s: %w", l.ns, name, err), l.ns))
	}
	fmt.Fprintf(l.out, "%s: Secret %s/%s %s (key %s: reads %s at %s)\n", r.cluster.Name, l.ns, name, op, v1alpha1.RemoteKubeconfigKey, remote, cred.server)
	return l.grantAgents(ctx, r, remote, name)
}

// agentServiceAccount is the agents' ServiceAccount (manifests/rbac/agent.yaml).
const agentServiceAccount = "meshcrypt-agent"

// grantAgents lets the reader's agents get the remote's Secret, and no other: a Role and
// RoleBinding meshcrypt-agent-clustermesh-REMOTE in the agents' namespace.
func (l linker) grantAgents(ctx context.Context, r *meshSide, remote, secret string) error {
	name := agentSecretRolePrefix + remote
	role := &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: l.ns}}
	op, err := controllerutil.CreateOrUpdate(ctx, r.c, role, func() error {
		role.Labels = mergeLabels(role.Labels, peerLabels(remote))
		role.Rules = []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"secrets"}, ResourceNames: []string{secret}, Verbs: []string{"get"}}}
		return nil
	})
	if err != nil {
		return r.fail(fmt.Errorf("apply Role %s/%s: %w", l.ns, name, err))
	}
	binding := &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: l.ns}}
	bop, err := controllerutil.CreateOrUpdate(ctx, r.c, binding, func() error {
		binding.Labels = mergeLabels(binding.Labels, peerLabels(remote))
		binding.RoleRef = rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: name}
		binding.Subjects = []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: agentServiceAccount, Namespace: l.ns}}
		return nil
	})
	if err != nil {
		return r.fail(fmt.Errorf("apply RoleBinding %s/%s: %w", l.ns, name, err))
	}
	fmt.Fprintf(l.out, "%s: Role and RoleBinding %s/%s %s/%s (the agents may get Secret %s, no other)\n", r.cluster.Name, l.ns, name, op, bop, secret)
	return nil
}

// addRemote writes, on r, its cluster name and ID if connect sets them, and the remote
// cluster's entry in spec.remoteClusters (replacing one of the same name).
func (l linker) addRemote(ctx context.Context, r *meshSide, remote v1alpha1.RemoteCluster) error {
	err := updateMeshConfig(ctx, r.c, func(mc *v1alpha1.MeshConfig) error {
		switch {
		case mc.Spec.Cluster == nil && r.setCluster:
			c := r.cluster
			mc.Spec.Cluster = &c
		case mc.Spec.Cluster == nil || *mc.Spec.Cluster != r.cluster:
			return fmt.Errorf("spec.cluster changed while connect ran (now %v, want %v): run connect again", mc.Spec.Cluster, r.cluster)
		}
		i := slices.IndexFunc(mc.Spec.RemoteClusters, func(rc v1alpha1.RemoteCluster) bool { return rc.Name == remote.Name })
		if i < 0 {
			mc.Spec.RemoteClusters = append(mc.Spec.RemoteClusters, remote)
		} else {
			mc.Spec.RemoteClusters[i] = remote
		}
		return nil
	})
	if err != nil {
		return r.fail(fmt.Errorf("update MeshConfig %s: %w", v1alpha1.MeshConfigName, err))
	}
	if r.setCluster {
		fmt.Fprintf(l.out, "%s: MeshConfig %s: spec.cluster set to name %s, ID %d\n", r.cluster.Name, v1alpha1.MeshConfigName, r.cluster.Name, r.cluster.ID)
	}
	fmt.Fprintf(l.out, "%s: MeshConfig %s: remote cluster %s (ID %d, Secret %s)\n", r.cluster.Name, v1alpha1.MeshConfigName, remote.Name, remote.ID, remote.SecretName)
	return nil
}

// connect joins the local cluster and the remote one in both directions.
func connect(ctx context.Context, g *globals, o connectOptions, out io.Writer) error {
	if o.tokenDuration < minTokenDuration {
		return fmt.Errorf("--token-duration %s: the API server issues tokens of at least %s", o.tokenDuration, minTokenDuration)
	}
	if err := checkServerURL("remote-api-server", o.remoteServer); err != nil {
		return err
	}
	if err := checkServerURL("local-api-server", o.localServer); err != nil {
		return err
	}
	local, remote, err := loadSides(ctx, g, o)
	if err != nil {
		return err
	}
	flags := map[*meshSide]clusterFlags{
		local: {name: "cluster-name", id: "cluster-id", nameVal: o.clusterName, idVal: o.clusterID,
			nameSet: o.set["cluster-name"], idSet: o.set["cluster-id"]},
		remote: {name: "to-cluster-name", id: "to-cluster-id", nameVal: o.toClusterName, idVal: o.toClusterID,
			nameSet: o.set["to-cluster-name"], idSet: o.set["to-cluster-id"]},
	}
	for _, s := range []*meshSide{local, remote} {
		var current *v1alpha1.ClusterSpec
		if s.exists {
			current = s.mc.Spec.Cluster
		}
		if s.cluster, s.setCluster, err = resolveCluster(current, flags[s], s.context); err != nil {
			return err
		}
	}
	if err := checkPair(local, remote); err != nil {
		return err
	}
	servers := map[*meshSide]apiServer{}
	if servers[remote], err = apiServerOf(remote, o.remoteServer, "remote-api-server"); err != nil {
		return err
	}
	if servers[local], err = apiServerOf(local, o.localServer, "local-api-server"); err != nil {
		return err
	}
	l := linker{out: out, ns: o.namespace, tokenDuration: o.tokenDuration}
	fmt.Fprintf(out, "connecting cluster %s (ID %d, context %q) and cluster %s (ID %d, context %q)\n",
		local.cluster.Name, local.cluster.ID, local.context, remote.cluster.Name, remote.cluster.ID, remote.context)

	// Grants and Secrets first, so that an agent sees a remote entry only once its Secret
	// is there.
	for _, p := range [][2]*meshSide{{local, remote}, {remote, local}} {
		reader, read := p[0], p[1]
		token, expires, err := l.grantReader(ctx, read, reader.cluster.Name)
		if err != nil {
			return err
		}
		kc, err := readerKubeconfig(read.cluster.Name, servers[read], token)
		if err != nil {
			return err
		}
		cred := credential{server: servers[read].url, kubeconfig: kc, expires: expires}
		if err := l.writeSecret(ctx, reader, read.cluster.Name, cred); err != nil {
			return err
		}
	}
	for _, p := range [][2]*meshSide{{local, remote}, {remote, local}} {
		reader, read := p[0], p[1]
		rc := v1alpha1.RemoteCluster{Name: read.cluster.Name, ID: read.cluster.ID, SecretName: clustermeshSecretPrefix + read.cluster.Name}
		if err := l.addRemote(ctx, reader, rc); err != nil {
			return err
		}
	}
	fmt.Fprintf(out, "connected %s <-> %s: the agents of %s reach %s at %s, those of %s reach %s at %s\n",
		local.cluster.Name, remote.cluster.Name,
		local.cluster.Name, remote.cluster.Name, servers[remote].url,
		remote.cluster.Name, local.cluster.Name, servers[local].url)
	for _, s := range []*meshSide{local, remote} {
		if s.setCluster {
			fmt.Fprintf(out, "%s: restart its agents so that they use the new cluster name and ID (kubectl --context %s -n %s rollout restart daemonset/meshcrypt-agent)\n",
				s.cluster.Name, s.context, o.namespace)
		}
	}
	fmt.Fprintf(out, "check each side with: %s clustermesh status --context CONTEXT\n", o.program)
	return nil
}

// disconnect undoes connect in both directions.
func disconnect(ctx context.Context, g *globals, o connectOptions, out io.Writer) error {
	local, remote, err := loadSides(ctx, g, o)
	if err != nil {
		return err
	}
	for _, s := range []*meshSide{local, remote} {
		if !s.exists || s.mc.Spec.Cluster == nil {
			return fmt.Errorf("context %q has no cluster name (MeshConfig %s spec.cluster), so it was never connected: nothing to disconnect", s.context, v1alpha1.MeshConfigName)
		}
		s.cluster = *s.mc.Spec.Cluster
	}
	if local.cluster.Name == remote.cluster.Name {
		return fmt.Errorf("both clusters are named %q (contexts %q and %q): they cannot be connected to each other", local.cluster.Name, local.context, remote.context)
	}
	l := linker{out: out, ns: o.namespace}
	for _, p := range [][2]*meshSide{{local, remote}, {remote, local}} {
		if err := l.removeRemote(ctx, p[0], p[1].cluster.Name); err != nil {
			return err
		}
	}
	for _, p := range [][2]*meshSide{{local, remote}, {remote, local}} {
		reader, read := p[0], p[1]
		secret := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: clustermeshSecretPrefix + read.cluster.Name, Namespace: o.namespace}}
		name := clustermeshReaderPrefix + reader.cluster.Name
		deletions := []struct {
			side *meshSide
			what string
			obj  client.Object
		}{
			{reader, "Secret " + o.namespace + "/" + secret.Name, secret},
			{reader, "RoleBinding " + o.namespace + "/" + agentSecretRolePrefix + read.cluster.Name, &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: agentSecretRolePrefix + read.cluster.Name, Namespace: o.namespace}}},
			{reader, "Role " + o.namespace + "/" + agentSecretRolePrefix + read.cluster.Name, &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: agentSecretRolePrefix + read.cluster.Name, Namespace: o.namespace}}},
			{read, "ClusterRoleBinding " + name, &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: name}}},
			{read, "ClusterRole " + name, &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: name}}},
			{read, "ServiceAccount " + o.namespace + "/" + name, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: o.namespace}}},
		}
		for _, d := range deletions {
			switch err := d.side.c.Delete(ctx, d.obj); {
			case err == nil:
				fmt.Fprintf(out, "%s: %s deleted\n", d.side.cluster.Name, d.what)
			case apierrors.IsNotFound(err):
				fmt.Fprintf(out, "%s: %s already absent\n", d.side.cluster.Name, d.what)
			default:
				return d.side.fail(fmt.Errorf("delete %s: %w", d.what, err))
			}
		}
	}
	fmt.Fprintf(out, "disconnected %s and %s\n", local.cluster.Name, remote.cluster.Name)
	return nil
}

// removeRemote removes the remote cluster named remote from r's spec.remoteClusters.
func (l linker) removeRemote(ctx context.Context, r *meshSide, remote string) error {
	removed := false
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		var mc v1alpha1.MeshConfig
		if err := r.c.Get(ctx, client.ObjectKey{Name: v1alpha1.MeshConfigName}, &mc); err != nil {
			return err
		}
		n := len(mc.Spec.RemoteClusters)
		mc.Spec.RemoteClusters = slices.DeleteFunc(mc.Spec.RemoteClusters, func(rc v1alpha1.RemoteCluster) bool { return rc.Name == remote })
		if removed = len(mc.Spec.RemoteClusters) < n; !removed {
			return nil
		}
		return r.c.Update(ctx, &mc)
	})
	if err != nil {
		return r.fail(fmt.Errorf("update MeshConfig %s: %w", v1alpha1.MeshConfigName, err))
	}
	if removed {
		fmt.Fprintf(l.out, "%s: MeshConfig %s: remote cluster %s removed\n", r.cluster.Name, v1alpha1.MeshConfigName, remote)
	} else {
		fmt.Fprintf(l.out, "%s: MeshConfig %s: no remote cluster %s\n", r.cluster.Name, v1alpha1.MeshConfigName, remote)
	}
	return nil
}
