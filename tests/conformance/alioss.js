// ali-oss (the browser/Node upload SDK) against the emulator, driven by tests/test_conformance_alioss.py.
//
// argv[2]: JSON {sts, oss, region, bucket, user: {id, secret}, role_arn, v4, proxy, prefix,
//                small: path, big: path, part_size, cancel_after}
// stdout: one JSON line {ok, sts_expiration, keys, parts_total, parts_before_cancel, parts_resumed,
//                        resumed_from} or {ok: false, stage, name, code, status, message}.
// With `proxy`, every request (STS and OSS) goes through that HTTP forward proxy via ali-oss's
// `agent` option; ali-oss's own `enableProxy` needs the unpinned `proxy-agent` package.
'use strict';

const OSS = require('ali-oss');
const { HttpProxyAgent } = require('http-proxy-agent');

const cfg = JSON.parse(process.argv[2]);
const agent = cfg.proxy ? new HttpProxyAgent(cfg.proxy, { keepAlive: true }) : undefined;
let stage = 'start';

async function assumeRole() {
  const sts = new OSS.STS({
    accessKeyId: cfg.user.id, accessKeySecret: cfg.user.secret, endpoint: cfg.sts, agent,
  });
  const { credentials } = await sts.assumeRole(cfg.role_arn, null, 900, 'alioss-conformance');
  return credentials;
}

function client(creds) {
  return new OSS({
    region: cfg.region, bucket: cfg.bucket, endpoint: cfg.oss, secure: false,
    accessKeyId: creds.AccessKeyId, accessKeySecret: creds.AccessKeySecret, stsToken: creds.SecurityToken,
    authorizationV4: cfg.v4, agent, timeout: 60000, retryMax: 0,
  });
}

// multipartUpload cancelled once `cancel_after` parts are done, then resumed from the checkpoint
// the progress callback handed out, round-tripped through JSON as an app would store it.
async function cancelAndResume(oss, key) {
  const opts = { parallel: 3, partSize: cfg.part_size };
  let saved = null;
  let before = 0;
  let cancelled = false;
  try {
    await oss.multipartUpload(key, cfg.big, {
      ...opts,
      // parts still in flight at cancel() may report later, even during the resume: ignore them
      progress: async (p, checkpoint) => {
        if (!checkpoint || cancelled) return;
        saved = JSON.stringify(checkpoint);
        before = checkpoint.doneParts.length;
        if (before >= cfg.cancel_after) {
          cancelled = true;
          oss.cancel();
        }
      },
    });
    throw new Error(`multipartUpload of ${key} finished before it could be cancelled`);
  } catch (err) {
    if (!oss.isCancel() || err.name !== 'cancel') throw err;
  }
  const checkpoint = JSON.parse(saved);
  let resumed = 0;
  await oss.multipartUpload(key, cfg.big, {
    ...opts, checkpoint, progress: async (p, cp) => { if (cp) resumed = cp.doneParts.length - before; },
  });
  const total = Math.ceil(checkpoint.fileSize / checkpoint.partSize);
  return { parts_total: total, parts_before_cancel: before, parts_resumed: resumed,
           resumed_from: checkpoint.uploadId };
}

async function main() {
  stage = 'AssumeRole';
  const creds = await assumeRole();
  const oss = client(creds);
  const small = `${cfg.prefix}small.txt`;
  const big = `${cfg.prefix}big.bin`;
  stage = 'put';
  await oss.put(small, cfg.small);
  stage = 'multipartUpload';
  const mp = await cancelAndResume(oss, big);
  return { ok: true, sts_expiration: creds.Expiration, keys: [small, big], ...mp };
}

main().then(
  (out) => { process.stdout.write(JSON.stringify(out) + '\n'); },
  (err) => {
    process.stdout.write(JSON.stringify({
      ok: false, stage, name: err.name, code: err.code, status: err.status, message: String(err.message),
    }) + '\n');
    process.exitCode = 1;
  },
);
