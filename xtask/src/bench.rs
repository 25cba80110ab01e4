pub fn run(_r:&std::path::Path,_f:Option<&str>)->anyhow::Result<()>{Ok(())}
