// Node 20 (Debian's) lacks Promise.withResolvers (Node 22), which newer js-libp2p dependencies call.
Promise.withResolvers ??= function withResolvers () {
  let resolve, reject
  const promise = new Promise((res, rej) => { resolve = res; reject = rej })
  return { promise, resolve, reject }
}
