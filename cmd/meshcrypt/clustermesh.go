package main

import (
	"time"

	"github.com/spf13/cobra"
)

// The objects `clustermesh connect` creates, named after the cluster on the other side.
const (
	// clustermeshSecretPrefix + remote name: on the reading cluster, the Secret (in the
	// agents' namespace) with the kubeconfig that reads the remote.
	clustermeshSecretPrefix = "meshcrypt-clustermesh-"
	// clustermeshReaderPrefix + reader name: on the cluster being read, the ServiceAccount
	// (in the agents' namespace), ClusterRole and ClusterRoleBinding of the reader.
	clustermeshReaderPrefix = "meshcrypt-clustermesh-reader-"
	// agentSecretRolePrefix + remote name: on the reading cluster, the Role and RoleBinding
	// that let its agents get that Secret.
	agentSecretRolePrefix = "meshcrypt-agent-clustermesh-"
	// labelClustermeshPeer marks every object connect creates with the name of the cluster
	// on the other side.
	labelClustermeshPeer = "meshcrypt.io/clustermesh-peer"
	// labelManagedBy and managedBy mark the objects as the CLI's.
	labelManagedBy = "app.kubernetes.io/managed-by"
	managedBy      = "meshcrypt-cli"
	// annotationTokenExpires on the Secret records when its token expires (RFC 3339), so
	// `clustermesh status` can show it without decoding the token.
	annotationTokenExpires = "meshcrypt.io/token-expires"
	// defaultTokenDuration is --token-duration's default: a year.
	defaultTokenDuration = 8760 * time.Hour
)

func newClustermeshCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "clustermesh",
		Short: "join clusters into one mesh: connect, disconnect and show the remote clusters",
		Long: `Join clusters into one mesh, so that pods of one cluster reach pods of another encrypted, and
policies can name the other cluster's workloads by label.

Each cluster's agents read the other cluster's MeshNodes and MeshIdentities with a token that
may only get, list and watch those two resources. "connect" sets that up in both directions,
"status" shows what the local agents see of each remote cluster, "disconnect" removes it.`,
	}
	cmd.AddCommand(newClustermeshConnectCmd(g), newClustermeshDisconnectCmd(g), newClustermeshStatusCmd(g))
	return cmd
}

// connectOptions are the flags of connect and disconnect.
type connectOptions struct {
	toKubeconfig, toContext string
	namespace               string
	clusterName             string
	clusterID               int32
	toClusterName           string
	toClusterID             int32
	localServer             string
	remoteServer            string
	tokenDuration           time.Duration
	// set says which of the cluster name and ID flags were given.
	set map[string]bool
	// program is the CLI's display name, for the hints connect prints.
	program string
}

// registerRemote registers the flags that name the remote cluster and the namespace.
func (o *connectOptions) registerRemote(cmd *cobra.Command) {
	f := cmd.Flags()
	f.StringVar(&o.toContext, "to-context", "", "kubeconfig context of the remote cluster (required)")
	f.StringVar(&o.toKubeconfig, "to-kubeconfig", "", "kubeconfig file of the remote cluster (default: the local cluster's, as --kubeconfig)")
	f.StringVar(&o.namespace, "namespace", agentNamespace, "the agents' namespace on both clusters: holds the Secrets and the reader ServiceAccounts")
	_ = cmd.MarkFlagRequired("to-context")
}

func newClustermeshConnectCmd(g *globals) *cobra.Command {
	o := connectOptions{}
	cmd := &cobra.Command{
		Use:   "connect --to-context CONTEXT [--cluster-name NAME --cluster-id ID] [--to-cluster-name NAME --to-cluster-id ID]",
		Short: "connect the local cluster and another one both ways: RBAC, tokens, Secrets and MeshConfig entries",
		Long: `Connect the local cluster (--kubeconfig and --context, as for every command) and the remote
cluster (--to-context, in --to-kubeconfig or the same kubeconfig) in both directions.

For each direction, on the cluster being read it creates a ServiceAccount
meshcrypt-clustermesh-reader-READER in the agents' namespace, a ClusterRole of the same name
that allows only get, list and watch on meshnodes and meshidentities (API group meshcrypt.io),
and a ClusterRoleBinding, and requests a token for the ServiceAccount (TokenRequest API, valid
for --token-duration). On the reading cluster it writes the Secret
meshcrypt-clustermesh-REMOTE (key "kubeconfig": the remote API server's URL and CA and the
token) and adds the remote cluster (name, ID, Secret) to spec.remoteClusters of MeshConfig
"default", keeping every other field.

Both clusters need a name and an ID (MeshConfig spec.cluster), different from each other and
from every other cluster of the mesh: identities carry the ID. If a cluster has none yet, give
it one with --cluster-name/--cluster-id (local) or --to-cluster-name/--to-cluster-id (remote);
then restart that cluster's agents (kubectl -n meshcrypt rollout restart daemonset/meshcrypt-agent),
which read it when they start. A name or ID that is already set is never changed.

The agents of each cluster must reach the other's API server. By default they use the server
URL of the operator's kubeconfig; when the nodes reach it at another address (a load balancer,
a private endpoint), give it with --remote-api-server (how the local nodes reach the remote
cluster) and --local-api-server (how the remote nodes reach the local cluster).

Running connect again is safe: it updates the objects and writes a fresh token (earlier tokens
stay valid until they expire, or until disconnect deletes the ServiceAccount).

Permissions on each cluster: create and update serviceaccounts and secrets in the agents'
namespace, create serviceaccounts/token, create and update clusterroles and
clusterrolebindings (and hold get, list and watch on meshnodes and meshidentities, which the
ClusterRole grants), get, create and update meshconfigs.`,
		Example: `  # contexts "east" and "west", both clusters new to the mesh:
  meshcrypt clustermesh connect --context east --cluster-name east --cluster-id 1 \
      --to-context west --to-cluster-name west --to-cluster-id 2

  # the remote cluster in its own kubeconfig, its API server reached by the local nodes
  # through a private endpoint:
  meshcrypt clustermesh connect --to-kubeconfig west.kubeconfig --to-context west \
      --remote-api-server https://10.0.0.10:6443`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o.program = cmd.Root().DisplayName()
			o.set = map[string]bool{}
			for _, f := range []string{"cluster-name", "cluster-id", "to-cluster-name", "to-cluster-id"} {
				o.set[f] = cmd.Flags().Changed(f)
			}
			return connect(cmd.Context(), g, o, cmd.OutOrStdout())
		},
	}
	o.registerRemote(cmd)
	f := cmd.Flags()
	f.StringVar(&o.clusterName, "cluster-name", "", "set the local cluster's name (MeshConfig spec.cluster.name) if it has none")
	f.Int32Var(&o.clusterID, "cluster-id", 0, "set the local cluster's ID, 1-255 (MeshConfig spec.cluster.id) if it has none")
	f.StringVar(&o.toClusterName, "to-cluster-name", "", "set the remote cluster's name if it has none")
	f.Int32Var(&o.toClusterID, "to-cluster-id", 0, "set the remote cluster's ID, 1-255, if it has none")
	f.StringVar(&o.remoteServer, "remote-api-server", "", "URL at which the local nodes reach the remote API server (default: the server of --to-context)")
	f.StringVar(&o.localServer, "local-api-server", "", "URL at which the remote nodes reach the local API server (default: the server of --context)")
	f.DurationVar(&o.tokenDuration, "token-duration", defaultTokenDuration, "how long the tokens in the Secrets stay valid (the API server may cap it)")
	return cmd
}

func newClustermeshDisconnectCmd(g *globals) *cobra.Command {
	o := connectOptions{}
	cmd := &cobra.Command{
		Use:   "disconnect --to-context CONTEXT",
		Short: "undo connect: remove both sides' MeshConfig entries, Secrets and reader RBAC",
		Long: `Undo connect in both directions: remove the remote cluster from spec.remoteClusters of each
side's MeshConfig "default" (the agents then remove its peers and identities), delete the
Secret meshcrypt-clustermesh-REMOTE, and delete the ServiceAccount, ClusterRole and
ClusterRoleBinding meshcrypt-clustermesh-reader-READER, which revokes every token connect
issued for it. The clusters' names and IDs stay. Running it again is harmless.

Both clusters must be reachable. Permissions on each cluster: get and update meshconfigs,
delete secrets and serviceaccounts in the agents' namespace, delete clusterroles and
clusterrolebindings.`,
		Example: `  meshcrypt clustermesh disconnect --context east --to-context west`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return disconnect(cmd.Context(), g, o, cmd.OutOrStdout())
		},
	}
	o.registerRemote(cmd)
	return cmd
}

func newClustermeshStatusCmd(g *globals) *cobra.Command {
	var o meshStatusOptions
	cmd := &cobra.Command{
		Use:   "status [-o table|json|yaml]",
		Short: "show each remote cluster: its Secret, from how many local nodes it is reachable, nodes and identities imported, peers ready",
		Long: `Prints the verdict first, then one row per remote cluster of MeshConfig spec.remoteClusters:
whether its Secret (and the kubeconfig in it) is there and when its token expires; from how
many local nodes it is reachable (the agents' MeshNode status.remoteClusters: Connected, or
Unreachable or Refused with the agent's message); and the remote nodes and identities the
local nodes imported and the remote peers they have ready. These counts are per local node,
so the table shows the lowest and highest across the local nodes ("3", or "2-3" when the
nodes disagree); a node imports every remote node, so the lowest is what every node has.

Exit status:
  0  every remote cluster is Connected on every local node and its Secret is in place
  1  not so: the verdict and the lines under the table say which remote, node and why (also
     when no remote cluster is configured, or no agent reports yet)
  2  the status could not be read: no kubeconfig, API server unreachable, missing
     permissions, bad flag

Permissions: get meshconfigs, list meshnodes (API group meshcrypt.io), get secrets in the
agents' namespace.`,
		Example: `  meshcrypt clustermesh status
  meshcrypt clustermesh status --context west -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return clustermeshStatus(cmd.Context(), g, o, cmd.OutOrStdout())
		},
	}
	addOutputFlag(cmd, &o.output)
	cmd.Flags().StringVar(&o.namespace, "namespace", agentNamespace, "the agents' namespace, which holds the remote clusters' Secrets")
	return cmd
}
