// Used by tests/content/test_ipfs_bitswap.py.  js-libp2p 2.x with Helia's Bitswap (@helia/bitswap 2.x, the one helia 5
// ships) on 127.0.0.1, serving one raw block.  (helia's own entry point loads
// WebRTC, whose native module cannot be built here.)
import './polyfill.mjs'
import { createLibp2p } from 'libp2p'
import { tcp } from '@libp2p/tcp'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import { createBitswap } from '@helia/bitswap'
import { MemoryBlockstore } from 'blockstore-core'
import { defaultLogger } from '@libp2p/logger'
import { CID } from 'multiformats/cid'
import * as raw from 'multiformats/codecs/raw'
import { sha256 } from 'multiformats/hashes/sha2'

const data = new TextEncoder().encode(process.argv[2] ?? 'hello from helia bitswap\n')
const cid = CID.createV1(raw.code, await sha256.digest(data))
const blockstore = new MemoryBlockstore()
await blockstore.put(cid, data)
const libp2p = await createLibp2p({
  addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
  transports: [tcp()], connectionEncrypters: [noise()], streamMuxers: [yamux()],
  services: { identify: identify() }
})
const routing = { async * findProviders () {}, async provide () {}, async cancelReprovide () {}, async put () {}, async get () { throw new Error('none') }, async * getClosestPeers () {}, async findPeer () { throw new Error('none') } }
const bitswap = createBitswap({ blockstore, libp2p, routing, logger: defaultLogger() })
await bitswap.start()
console.log(JSON.stringify({ addr: libp2p.getMultiaddrs()[0].toString(), cid: cid.toString() }))
process.stdin.on('end', async () => { await bitswap.stop(); await libp2p.stop(); process.exit(0) })
process.stdin.resume()
