#!/usr/bin/env bash
# The cluster's security group, made once before `ray up`: SSH only from SSH_CIDR (your office or VPN range),
# and every port between the cluster's own nodes. Without it Ray's launcher makes a group with SSH open to
# 0.0.0.0/0. Prints the group id to put in ray_cluster.yaml (SecurityGroupIds of every node type).
#   SSH_CIDR=198.51.100.0/24 VPC_ID=vpc-... infra/aws/create_security_group.sh
set -euo pipefail
: "${SSH_CIDR:?set SSH_CIDR to the address range allowed to SSH in, e.g. 198.51.100.0/24}"
: "${VPC_ID:?set VPC_ID to the VPC the cluster runs in}"
NAME=${GROUP_NAME:-inception-pipeline-nodes}
if ! [[ $SSH_CIDR =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}/([0-9]|[12][0-9]|3[0-2])$ ]]; then
    echo "create_security_group: error: SSH_CIDR=$SSH_CIDR is not an IPv4 range like 198.51.100.0/24" >&2
    exit 2
fi
if [[ ${SSH_CIDR#*/} -lt 8 ]]; then
    echo "create_security_group: error: SSH_CIDR=$SSH_CIDR opens SSH to a large part of the internet; name your own range" >&2
    exit 2
fi
SG=$(aws ec2 create-security-group --group-name "$NAME" --vpc-id "$VPC_ID" \
    --description "inception-pipeline Ray nodes: SSH from $SSH_CIDR, all traffic between members" \
    --query GroupId --output text)
aws ec2 authorize-security-group-ingress --group-id "$SG" --protocol tcp --port 22 --cidr "$SSH_CIDR" >/dev/null
aws ec2 authorize-security-group-ingress --group-id "$SG" --protocol -1 --source-group "$SG" >/dev/null
echo "$SG"
